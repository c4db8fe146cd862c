"""Cluster launchers (``sfd_train.launchers``, folder ``launchers/``): ``sfd-launch``.

* ``cli``       the sfd-launch command
* ``config``    the ``launcher:`` section of a job config
* ``contract``  what the scripts and the trainer agree on (requeue exit code, REQUEUE file)
* ``job``       a launch resolved: absolute paths, processes, trainer command, frozen config
* ``layout``    the mesh, micro-batch and accumulation for the nodes a job was given
* ``local``     torchrun on this machine
* ``node``      the per-node script (environment, version log, torchrun, signal forwarding)
* ``slurm``     the sbatch script and its submission
* ``ascend``    CANN, HCCL and NPU settings; one command per node without Slurm
* ``render``    template filling and atomic writes

Nothing is imported here: ``sfd_train.config`` imports ``launchers/config.py`` while it
loads, and the trainer imports ``sfd_train.launchers.contract`` without the rest.
"""
