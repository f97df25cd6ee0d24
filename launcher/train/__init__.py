"""The training loop and what it drives: optimizer and schedule, checkpoints written and read, stop requests,
the run directory, the metrics log and its curves."""
