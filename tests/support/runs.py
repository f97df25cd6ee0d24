"""Ways to run the real entry points (in this process, or as a user runs them) and to check what they wrote."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

def run_in_process(recipe_path: Path, *overrides: str) -> int:
    """The real entry point (`launcher.run.main`) in this process; Accelerate's singletons are reset first."""
    from accelerate.state import AcceleratorState, GradientState

    from launcher.run import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return main([str(recipe_path), *overrides])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python launcher/run.py ...` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "launcher" / "run.py"), *args],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


@torch.no_grad()
def eval_loss_of(model: torch.nn.Module, run_dir: Path) -> float:
    """Mean eval cross-entropy of `model` on the run's eval set, tokenized as the run did."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from launcher.tasks import prepare_task
    from launcher.recipe.loading import load_recipe

    recipe = load_recipe(run_dir / "recipe.resolved.yaml")
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenized = prepare_task(recipe, tokenizer).data.eval
    batch = DataCollatorWithPadding(tokenizer)([tokenized[i] for i in range(len(tokenized))])
    model.eval()
    return float(model(**batch).loss)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_predictions_agree(checkpoint: Path, model: Path, inputs: Path, folder: Path, tolerance: float = 1e-6) -> None:
    """`checkpoint` (rebuilt from the run's recipe) predicts what the exported `model` predicts."""
    from launcher.predict import main as predict

    for name, source in (("model", model), ("checkpoint", checkpoint)):
        assert predict([str(source), "--input", str(inputs), "--output", str(folder / f"{name}.csv")]) == 0
    exported, resumed = read_csv(folder / "model.csv"), read_csv(folder / "checkpoint.csv")
    assert [float(r["probability_LABEL_1"]) for r in resumed] == pytest.approx(
        [float(r["probability_LABEL_1"]) for r in exported], abs=tolerance)
