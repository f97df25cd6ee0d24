"""Nothing lost: a finished run's directory is refused unless resuming or overwriting, and a run that fails
(even one told to overwrite) leaves the previous run's outputs on disk."""

from __future__ import annotations

import pytest

from recipes import tiny_recipe, write_recipe
from runs import run_in_process
from launcher.model.loading import ModelError
from launcher.train.run_directory import REPLACED_PREFIX, RUN_SUMMARY


@pytest.fixture
def finished_run(assets, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(assets, tmp_path / "run", training={"max_steps": 2}))
    assert run_in_process(recipe) == 0
    run_dir = tmp_path / "run"
    return recipe, run_dir, (run_dir / "model" / "model.safetensors").read_bytes()


def test_finished_run_is_refused(finished_run, capsys):
    recipe, run_dir, weights = finished_run
    assert run_in_process(recipe) == 1
    assert "already holds a finished run" in capsys.readouterr().err
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights


def test_checkpoints_of_an_unfinished_run_are_refused_without_resume(finished_run, capsys):
    recipe, run_dir, _ = finished_run
    (run_dir / RUN_SUMMARY).unlink()  # as if it had been killed after its last checkpoint
    assert run_in_process(recipe) == 1
    assert "continue it with output.resume_from=auto" in capsys.readouterr().err
    assert any((run_dir / "checkpoints").iterdir())


def test_failed_overwrite_keeps_previous_outputs_until_a_run_finishes(finished_run, tmp_path, monkeypatch):
    recipe, run_dir, weights = finished_run
    # Data is prepared before the run directory is touched: a data error leaves the previous run where it was.
    assert run_in_process(recipe, "output.overwrite=true", f"data.train_file={tmp_path / 'missing.csv'}") == 1
    assert not list(run_dir.glob(f"{REPLACED_PREFIX}*"))
    assert (run_dir / "model" / "model.safetensors").read_bytes() == weights
    # A run that fails after setting the previous outputs aside (here: its model does not load) leaves them there.
    with monkeypatch.context() as patched:
        patched.setattr("launcher.run.load_model", lambda *args: (_ for _ in ()).throw(ModelError("no weights")))
        assert run_in_process(recipe, "output.overwrite=true") == 1
    kept = [folder / "model" / "model.safetensors" for folder in run_dir.glob(f"{REPLACED_PREFIX}*")]
    assert [path.read_bytes() for path in kept] == [weights]
    assert (kept[0].parent.parent / RUN_SUMMARY).is_file()

    assert run_in_process(recipe, "output.overwrite=true") == 0
    assert not list(run_dir.glob(f"{REPLACED_PREFIX}*")), "set-aside outputs go once the overwriting run finishes"
    assert (run_dir / RUN_SUMMARY).is_file()
