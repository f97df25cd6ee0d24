"""Benchmark harnesses: `python -m benchmarks.compare RECIPE` (see docs/benchmarks.md); results in results/."""
