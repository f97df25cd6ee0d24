"""Sweeps: `--array key=v1,v2` specs become the tasks of a Slurm job array (one output dir each); `collect`
reads every task's final metrics and throughput back into one table (`python -m launcher.sweep ROOT`)."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.cluster.slurm import SLURM_FILES
from launcher.train.reporting import METRICS_LOG, read_metrics_log
from launcher.train.run_directory import read_run_summary

SWEEP_MANIFEST = "sweep.json"
UNSAFE_PATH_CHARACTERS = re.compile(r"[^A-Za-z0-9._=+-]")


class SweepError(ValueError):
    """An `--array` spec that cannot be turned into tasks, or a folder that holds no sweep."""


@dataclass(frozen=True)
class SweepTask:
    index: int
    settings: tuple[tuple[str, str], ...]
    """(recipe key, value as typed) pairs this task overrides."""

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.settings]

    @property
    def slug(self) -> str:
        """Folder name: the task index (array order) and its settings, e.g. `1-training.lr=2e-5`."""
        settings = "_".join(self.overrides)
        return f"{self.index}-" + UNSAFE_PATH_CHARACTERS.sub("-", settings)


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """`training.lr=1e-5,2e-5` -> ("training.lr", ["1e-5", "2e-5"]). Values are split at every comma."""
    key, sep, values = spec.partition("=")
    choices = [value.strip() for value in values.split(",")]
    if not sep or not key.strip() or not all(choices):
        raise SweepError(f"--array {spec!r} is not of the form section.key=value1,value2[,...]")
    return key.strip(), choices


def expand(specs: list[str]) -> list[SweepTask]:
    """One task per combination of the specs' values (their cartesian product), in a stable order."""
    parsed = [parse_spec(spec) for spec in specs]
    keys = [key for key, _ in parsed]
    if len(set(keys)) != len(keys):
        raise SweepError(f"--array names a key twice: {keys}; list all its values in one spec")
    combinations = itertools.product(*(choices for _, choices in parsed))
    return [SweepTask(index, tuple(zip(keys, values))) for index, values in enumerate(combinations)]


def manifest_path(root: Path) -> Path:
    return root / SLURM_FILES / SWEEP_MANIFEST


def write_manifest(root: Path, tasks: list[SweepTask], run_dirs: list[Path]) -> Path:
    """The task list `collect` reads: each task's settings and output dir."""
    entries = [{"index": task.index, "settings": dict(task.settings), "dir": str(run_dir)}
               for task, run_dir in zip(tasks, run_dirs)]
    manifest = {"tasks": entries}
    path = manifest_path(root)
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return path


def samples_per_second(records: list[dict[str, Any]]) -> Optional[float]:
    """Training throughput over the logged steps, leaving out the first one (warm-up) when there are others."""
    steps = [r for r in records if r["kind"] == "train"]
    steps = steps[1:] if len(steps) > 1 else steps
    seconds = sum(r["step_seconds"] for r in steps)
    return sum(r["samples"] for r in steps) / seconds if seconds else None


def task_result(task: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(task["dir"])
    summary = read_run_summary(run_dir)
    records = read_metrics_log(run_dir) if (run_dir / METRICS_LOG).exists() else []
    row: dict[str, Any] = {"task": task["index"], **task["settings"]}
    row["state"] = "done" if summary else ("unfinished" if records else "not started")
    row["steps"] = summary["optimizer_steps"] if summary else None
    final = summary["final_eval"] if summary else {}
    row.update({f"eval_{name}": value for name, value in final.items() if name != "examples"})
    row["samples/s"] = samples_per_second(records)
    row["dir"] = str(run_dir)
    return row


def collect(root: str | Path) -> list[dict[str, Any]]:
    """One row per task of the sweep under `root`: its settings, state, steps, final eval and samples/s."""
    path = manifest_path(Path(root))
    if not path.is_file():
        raise SweepError(f"{root} holds no sweep ({path} is missing): pass the output.dir of a --array submission")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return [task_result(task) for task in manifest["tasks"]]


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    cells = [columns] + [[format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)
