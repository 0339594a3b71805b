"""Launching runs: local torchrun workers and Slurm jobs."""
