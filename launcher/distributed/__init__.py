"""Devices and processes: which accelerator, the Accelerator and its DeepSpeed / FSDP plugins, host memory,
and the libraries' messages."""
