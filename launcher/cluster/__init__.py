"""Slurm: batch scripts, submission, preemption and requeue."""
