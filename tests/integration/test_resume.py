"""Kill -9 and resume: the resumed run is the uninterrupted run, bit for bit (CPU, fp32, BERT with dropout)."""

from __future__ import annotations

import pytest

from recipes import tiny_recipe, write_recipe
from runs import run_in_process
from faults import assert_same_weights, final_weights, run_faulty, train_records

# 64 examples / batch 8 = 8 steps per epoch, 2 epochs = 16 steps; checkpoints every 3 steps and at epoch ends.
STEPS = 16
SAVE_EVERY = 3


def recipe_file(assets, folder, **training):
    recipe = tiny_recipe(
        assets, folder / "run", training={"seed": 7, **training}, output={"save_every_steps": SAVE_EVERY, "keep_last": 2}
    )
    return write_recipe(folder / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert run_in_process(recipe_file(assets, folder)) == 0
    return train_records(folder / "run"), final_weights(folder / "run")


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [1, 6, STEPS], ids=["step1", "save_step", "last_step"])
def test_kill9_then_resume_is_bit_identical(assets, tmp_path, uninterrupted, kill_step):
    recipe = recipe_file(assets, tmp_path)
    killed = run_faulty("kill", kill_step, "0", recipe)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert max(train_records(tmp_path / "run")) == kill_step

    assert run_in_process(recipe, "output.resume_from=auto") == 0

    expected_records, expected_weights = uninterrupted
    resumed = train_records(tmp_path / "run")
    assert [resumed[s]["loss"] for s in range(1, STEPS + 1)] == [expected_records[s]["loss"] for s in range(1, STEPS + 1)]
    assert [resumed[s]["lr"] for s in resumed] == [expected_records[s]["lr"] for s in expected_records]
    assert_same_weights(expected_weights, final_weights(tmp_path / "run"))


# Two processes (torchrun, gloo): 64 examples / (8 x 2) = 4 steps per epoch, 8 steps.
STEPS_2P = 8


@pytest.fixture(scope="module")
def uninterrupted_2p(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted_2p")
    done = run_faulty("none", 0, "all", recipe_file(assets, folder, log_sample_fingerprints=True), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return train_records(folder / "run"), final_weights(folder / "run")


@pytest.mark.slow
@pytest.mark.parametrize("kill_step, rank", [(1, "1"), (SAVE_EVERY, "1"), (STEPS_2P, "0")], ids=["step1", "save_step", "last_step"])
def test_kill9_one_rank_of_two_then_resume_is_bit_identical(assets, tmp_path, uninterrupted_2p, kill_step, rank):
    recipe = recipe_file(assets, tmp_path, log_sample_fingerprints=True)
    killed = run_faulty("kill", kill_step, rank, recipe, processes=2)
    assert killed.returncode != 0
    assert "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]

    resumed_run = run_faulty("none", 0, "all", recipe, "output.resume_from=auto", processes=2)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]

    expected_records, expected_weights = uninterrupted_2p
    resumed = train_records(tmp_path / "run")
    for key in ("loss", "lr", "sample_fingerprints"):
        assert [resumed[s][key] for s in range(1, STEPS_2P + 1)] == [expected_records[s][key] for s in range(1, STEPS_2P + 1)], key
    assert_same_weights(expected_weights, final_weights(tmp_path / "run"))
