"""Stand-ins for cluster tools (sbatch, srun, scontrol, torchrun) and helpers the launcher
tests share (``harness``). The stand-in Slurm serves only what the real cluster of
scripts/slurm_cluster.sh cannot (Ascend NPU nodes); the stand-in torchrun keeps the script
tests fast on the real cluster too."""
