"""What `--check` tells before any weight is loaded: the run plan and the per-device memory estimate."""
