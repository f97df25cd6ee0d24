"""The accelerator kit: one prepared command (`bash benchmarks/device/run.sh`) that verifies and measures the
launcher on a lent GPU inside its time, and runs in a CPU smoke mode in CI so it cannot rot. See run.sh."""
