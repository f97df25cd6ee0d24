"""SIGTERM / SIGUSR1 (Slurm's preemption warning): at the next step boundary every rank agrees, exactly one
complete checkpoint is written, and each process exits with EXIT_STOPPED_FOR_RESUME (3)."""

from __future__ import annotations


import pytest

from recipes import tiny_recipe, write_recipe
from runs import REPO, run_in_process
from faults import patches, start_ranks, train_records
from launcher.train.checkpoints import CHECKPOINTS
from launcher.train.stopping import EXIT_STOPPED_FOR_RESUME


def recipe_without_periodic_saves(assets, tmp_path):
    recipe = tiny_recipe(assets, tmp_path / "run", output={"save_every_epoch": False})
    return write_recipe(tmp_path / "recipe.yaml", recipe)


def test_exit_code_is_the_documented_one():
    docs = (REPO / "docs" / "checkpoints.md").read_text()
    assert f"| {EXIT_STOPPED_FOR_RESUME} | stopped by SIGTERM / SIGUSR1 after writing a checkpoint" in docs


@pytest.mark.parametrize("fault", ["sigterm", "sigusr1"])
def test_signal_writes_one_checkpoint_and_exits_3(assets, tmp_path, monkeypatch, restore_signal_handlers, capsys, fault):
    recipe = recipe_without_periodic_saves(assets, tmp_path)
    with monkeypatch.context() as patched:
        for owner, name, replacement in patches(fault, 5):
            patched.setattr(owner, name, replacement)
        assert run_in_process(recipe) == EXIT_STOPPED_FOR_RESUME
    assert f"stopped by {fault.upper()} at optimizer step 5" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "run" / CHECKPOINTS).iterdir()] == ["step-00000005"]
    assert max(train_records(tmp_path / "run")) == 5

    assert run_in_process(recipe, "output.resume_from=auto") == 0
    assert max(train_records(tmp_path / "run")) == 16


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_at_one_checkpoint(assets, tmp_path):
    ranks = start_ranks("sigusr1", 2, "1", recipe_without_periodic_saves(assets, tmp_path), "training.collective_timeout_s=30")
    outputs = [rank.communicate(timeout=180)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [EXIT_STOPPED_FOR_RESUME] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    assert "stopped by a peer rank at optimizer step 2" in outputs[0]
    assert [p.name for p in (tmp_path / "run" / CHECKPOINTS).iterdir()] == ["step-00000002"]
