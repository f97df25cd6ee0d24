"""Accuracy of each variant across several comparisons, one per training seed: how the harness checks that a faster
variant keeps the accuracy. One epoch of one seed is noisy (which examples share a batch moves the result by a few
hundredths), so a variant is judged by its paired difference to a baseline over seeds, not by one number.

    for seed in 1 2 3; do
        python -m benchmarks.compare recipes/demo.yaml training.seed=$seed --samples 1000 --repeats 1 \\
            --variants tutorial_dynamic,launcher_default,launcher_dynamic --name demo-seed$seed
    done
    python -m benchmarks.accuracy_table benchmarks/results/demo-seed*.json --against tutorial_dynamic
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def seed_of(result: dict[str, Any]) -> int:
    return result["recipe"]["training"]["seed"]


def accuracies(result: dict[str, Any]) -> dict[str, float]:
    """Median accuracy over a comparison's repeats, per variant that was measured."""
    return {v["name"]: v["summary"]["accuracy"]["median"] for v in result["variants"] if "accuracy" in v.get("summary", {})}


def accuracy_table(results: list[dict[str, Any]], against: str) -> str:
    """Markdown: a row per variant, a column per seed, then the mean and the paired difference to `against`."""
    results = sorted(results, key=seed_of)
    per_seed = [accuracies(r) for r in results]
    if any(against not in a for a in per_seed):
        raise ValueError(f"--against {against}: not measured in every result file")
    names = [n for n in per_seed[0] if all(n in a for a in per_seed)]
    header = ["variant", *(f"seed {seed_of(r)}" for r in results), "mean", f"minus {against}: mean [min, max]"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in names:
        values = [a[name] for a in per_seed]
        differences = [a[name] - a[against] for a in per_seed]
        cells = [name, *(f"{v:.3f}" for v in values), f"{statistics.fmean(values):.3f}",
                 f"{statistics.fmean(differences):+.3f} [{min(differences):+.3f}, {max(differences):+.3f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Accuracy per variant across comparison result files (one per seed).")
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by benchmarks.compare")
    parser.add_argument("--against", default="tutorial_dynamic", help="variant the differences are taken to")
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text(encoding="utf-8")) for path in args.results]
    print(accuracy_table(results, args.against))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
