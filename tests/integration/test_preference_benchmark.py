"""The preference baselines of `benchmarks.compare` on the tiny chat Llama: TRL's `RewardTrainer` and `DPOTrainer`,
measured like the launcher on the same pairs."""

from __future__ import annotations

import json
import sys

import pytest

from recipes import preference_recipe, write_recipe
from runs import REPO

sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not part of the installed package

from benchmarks.compare import main as compare_main  # noqa: E402
from benchmarks.trl_preference_baseline import run_baseline  # noqa: E402
from launcher.model.loading import load_tokenizer  # noqa: E402
from launcher.recipe.loading import load_recipe  # noqa: E402
from launcher.tasks import prepare_task  # noqa: E402


def launcher_real_tokens(recipe_path) -> int:
    """Both answers' tokens (prompt included) over the launcher's whole training set."""
    recipe = load_recipe(recipe_path)
    train = prepare_task(recipe, load_tokenizer(recipe.model)).data.train
    return sum(map(len, train["input_ids"])) + sum(map(len, train["rejected_input_ids"]))


@pytest.mark.slow  # two TRL trainings of one epoch
@pytest.mark.parametrize("task_type", ["reward", "dpo"])
def test_trl_trains_the_launchers_pairs_and_is_scored_by_the_launchers_evaluation(assets, tmp_path, task_type):
    """One epoch (48 pairs, 12 steps of 4): TRL sees every pair once, so its tokens are the launcher's (the same chat
    template renders the same rows), and the launcher's evaluation scores the model it trained."""
    recipe_path = write_recipe(tmp_path / "r.yaml", preference_recipe(assets, tmp_path / "unused", task_type))
    records = run_baseline(load_recipe(recipe_path), task_type, steps=12, out=tmp_path / "trl")
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["samples"] for r in steps] == [4] * 12
    assert sum(r["real_tokens"] for r in steps) == launcher_real_tokens(recipe_path)
    evaluation = records[-1]
    assert evaluation["kind"] == "eval" and evaluation["examples"] == 16 and 0 <= evaluation["accuracy"] <= 1
    assert evaluation["loss"] != pytest.approx(0.6931, abs=1e-4), "the evaluated model is the trained one"


@pytest.mark.slow  # two fresh processes, each importing torch, transformers and TRL
def test_compare_measures_trl_and_the_launcher_on_the_same_pairs(assets, tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml", preference_recipe(assets, tmp_path / "unused", "reward"))
    code = compare_main([
        str(recipe_path), "--samples", "48", "--warmup-steps", "0", "--repeats", "1",
        "--variants", "trl_padded,trl_reward,trl_dpo,launcher_default,launcher_packed",
        "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), "--name", "reward",
    ])
    assert code == 0
    result = json.loads((tmp_path / "results" / "reward.json").read_text())
    assert result["baselines"] == ["trl_reward"], "the SFT and DPO baselines do not run on a reward recipe"
    runs = {v["name"]: v["runs"][0] for v in result["variants"]}
    assert list(runs) == ["trl_reward", "launcher_default"], "pairs are never packed"
    real = launcher_real_tokens(recipe_path)
    for run in runs.values():
        assert run["samples_measured"] == 48
        assert run["real_tokens_per_s"] * run["seconds_measured"] == pytest.approx(real)
