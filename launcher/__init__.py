"""Fine-tuning launcher: one YAML recipe, one command, from a laptop CPU to GPU, NPU and Slurm clusters."""

__version__ = "0.1.0"
