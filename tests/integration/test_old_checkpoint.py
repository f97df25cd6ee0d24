"""A run written by main at 8c5351f (before the package was re-laid out) still reloads and resumes.

tests/integration/fixtures/run_8c5351f holds what that commit wrote for `recipe.yaml` (tiny BERT without dropout, 40 rows,
batch 8, 2 epochs = 10 steps, a checkpoint every 3 steps): `run/metrics.jsonl` of the whole uninterrupted run,
its `recipe.resolved.yaml`, and the sealed checkpoint of step 6 (mid-epoch 2). Made with
`python -m launcher.run recipe.yaml` from a checkout of 8c5351f, then trimmed to the step-6 checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runs import run_in_process
from faults import read_metrics_log, train_records
from launcher.recipe.loading import load_recipe

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_8c5351f"


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture as the working directory (its recipe's paths are relative)."""
    folder = tmp_path / "old_run"
    shutil.copytree(FIXTURE, folder)
    monkeypatch.chdir(folder)
    return folder


def test_the_old_resolved_recipe_reloads_unchanged(old_run):
    recipe = load_recipe(old_run / "run" / "recipe.resolved.yaml")
    assert recipe == load_recipe(old_run / "recipe.yaml")
    assert (recipe.training.seed, recipe.output.save_every_steps, recipe.data.max_length) == (7, 3, 32)


def test_the_old_checkpoint_resumes_into_the_old_runs_losses(old_run):
    uninterrupted = train_records(old_run / "run")
    logged_before = len(read_metrics_log(old_run / "run"))
    old_eval = [r for r in read_metrics_log(old_run / "run") if r["kind"] == "eval"][-1]

    assert run_in_process(old_run / "recipe.yaml", "output.resume_from=run/checkpoints/step-00000006") == 0

    log = read_metrics_log(old_run / "run")
    relogged = [r["step"] for r in log[logged_before:] if r["kind"] == "train"]
    assert relogged == [7, 8, 9, 10]  # the resumed run logged its own steps (the comparison below is not vacuous)
    resumed = train_records(old_run / "run")
    assert sorted(resumed) == list(range(1, 11))
    for step in range(7, 11):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], abs=1e-6), step
    new_eval = [r for r in read_metrics_log(old_run / "run") if r["kind"] == "eval"][-1]
    assert new_eval["step"] == old_eval["step"] == 10
    assert new_eval["loss"] == pytest.approx(old_eval["loss"], abs=1e-6)
