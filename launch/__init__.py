"""Launchers: torchrun and deepspeed wrapper scripts, and a multi-node Slurm sbatch template."""
