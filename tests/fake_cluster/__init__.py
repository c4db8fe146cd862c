"""Stand-ins for cluster tools (sbatch, srun, scontrol, torchrun), a stand-in trainer,
and helpers the launcher tests share (``harness``)."""
