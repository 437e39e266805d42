"""Slurm access: the JobSystem interface, its Slurm and local implementations, squeue
parsing, and the job scripts rendered from slurm/ templates."""
