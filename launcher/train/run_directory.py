"""The run directory: what it holds, when a new run may use it, and the resolved recipe written into it.

A run never deletes or overwrites another run's outputs unless the recipe says `output.overwrite: true`, and
even then only once it has finished: until then the previous outputs wait in `replaced-<time>/`, so a run
that fails loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from launcher.recipe.schema import Recipe
from launcher.tasks import TASK_OUTPUT_FILES
from launcher.train.checkpoints import CHECKPOINTS

RESOLVED_RECIPE = "recipe.resolved.yaml"
RUN_SUMMARY = "run_summary.json"
REPLACED_PREFIX = "replaced-"
RUN_OUTPUTS = (CHECKPOINTS, "model", "adapter", "tensorboard", "metrics.jsonl", RUN_SUMMARY, RESOLVED_RECIPE,
               "curves.png", *TASK_OUTPUT_FILES)
"""What marks a folder as a run's, whichever task wrote it."""


class RunDirectoryError(RuntimeError):
    """The output directory holds another run that this one must not touch."""


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(recipe_yaml(recipe).encode()).hexdigest()


def check_run_directory(recipe: Recipe) -> None:
    """Refuse to start a fresh run over a previous one (finished or not) unless resuming or told to overwrite."""
    out = Path(recipe.output.dir)
    if recipe.output.overwrite or not out.exists():
        return
    finished = (out / RUN_SUMMARY).exists()
    has_checkpoints = any((out / CHECKPOINTS).glob("step-*")) if (out / CHECKPOINTS).is_dir() else False
    if finished and recipe.output.resume_from is None:
        raise RunDirectoryError(
            f"{out} already holds a finished run; choose another output.dir or set output.overwrite=true"
        )
    if has_checkpoints and recipe.output.resume_from is None:
        raise RunDirectoryError(
            f"{out} holds checkpoints of an earlier run; continue it with output.resume_from=auto, "
            "or set output.overwrite=true to start over"
        )


def prepare_run_directory(recipe: Recipe, is_main_process: bool) -> Path:
    """Create the directory, set a previous run's outputs aside when overwriting, write the resolved recipe
    (main process only)."""
    out = Path(recipe.output.dir)
    if is_main_process:
        if recipe.output.overwrite and recipe.output.resume_from is None:
            set_aside_previous_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESOLVED_RECIPE).write_text(recipe_yaml(recipe), encoding="utf-8")
    return out


def set_aside_previous_outputs(out: Path) -> None:
    present = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if not present:
        return
    aside = Path(tempfile.mkdtemp(prefix=f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-", dir=out))
    for path in present:
        os.rename(path, aside / path.name)
    print(f"output.overwrite: the previous run's outputs are in {aside} until this run finishes")


def write_run_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Mark the run finished; only now are outputs that an overwrite set aside removed."""
    (run_dir / RUN_SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    for replaced in run_dir.glob(f"{REPLACED_PREFIX}*"):
        shutil.rmtree(replaced)


def read_run_summary(run_dir: str | Path) -> Optional[dict[str, Any]]:
    path = Path(run_dir) / RUN_SUMMARY
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
