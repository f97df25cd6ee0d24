"""Accuracy of each variant across several comparisons, one per training seed: how the harness checks that a faster
variant keeps the accuracy. One epoch of one seed is noisy (which examples share a batch moves the result by a few
hundredths), so a variant is judged by its paired difference to a baseline over seeds, not by one number.
`--metric eval_loss` tabulates the final eval loss instead: a finer measure than accuracy on a small eval set.

    for seed in 1 2 3; do
        python -m benchmarks.compare recipes/demo.yaml training.seed=$seed --samples 1000 --repeats 1 \\
            --variants tutorial_dynamic,launcher_default,launcher_dynamic --name demo-seed$seed
    done
    python -m benchmarks.accuracy_table benchmarks/results/demo-seed*.json --against tutorial_dynamic [--metric eval_loss]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def seed_of(result: dict[str, Any]) -> int:
    return result["recipe"]["training"]["seed"]


METRICS = ("accuracy", "eval_loss")


def medians(result: dict[str, Any], metric: str) -> dict[str, float]:
    """Median of `metric` over a comparison's repeats, per variant that was measured."""
    return {v["name"]: v["summary"][metric]["median"] for v in result["variants"] if metric in v.get("summary", {})}


def standard_error(values: list[float]) -> float:
    """Of the mean, from the spread between seeds (0 for a single seed: no spread measured)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def accuracy_table(results: list[dict[str, Any]], against: str, metric: str = "accuracy") -> str:
    """Markdown: a row per variant, a column per seed, then the mean and the paired difference to `against`."""
    results = sorted(results, key=seed_of)
    per_seed = [medians(r, metric) for r in results]
    if any(against not in a for a in per_seed):
        raise ValueError(f"--against {against}: {metric} not measured in every result file")
    names = [n for n in per_seed[0] if all(n in a for a in per_seed)]
    header = ["variant", *(f"seed {seed_of(r)}" for r in results), "mean", f"minus {against}: mean ± s.e. [min, max]"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in names:
        values = [a[name] for a in per_seed]
        differences = [a[name] - a[against] for a in per_seed]
        cells = [name, *(f"{v:.3f}" for v in values), f"{statistics.fmean(values):.3f}",
                 f"{statistics.fmean(differences):+.3f} ± {standard_error(differences):.3f} "
                 f"[{min(differences):+.3f}, {max(differences):+.3f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Accuracy per variant across comparison result files (one per seed).")
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by benchmarks.compare")
    parser.add_argument("--against", default="tutorial_dynamic", help="variant the differences are taken to")
    parser.add_argument("--metric", choices=METRICS, default="accuracy", help="what to tabulate (eval_loss: lower is better)")
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text(encoding="utf-8")) for path in args.results]
    try:
        print(accuracy_table(results, args.against, args.metric))
    except ValueError as err:  # e.g. eval_loss asked of result files written before the harness logged it
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
