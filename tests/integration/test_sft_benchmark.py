"""The SFT baselines of `benchmarks.compare` on the tiny chat Llama: TRL's `SFTTrainer` padded and padding-free,
measured like the launcher on the same rows."""

from __future__ import annotations

import json
import sys

import pytest

from recipes import sft_recipe, write_recipe
from runs import REPO

sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not part of the installed package

from benchmarks.compare import main as compare_main  # noqa: E402
from benchmarks.trl_baseline import run_baseline  # noqa: E402
from launcher.model.loading import load_tokenizer  # noqa: E402
from launcher.recipe.loading import load_recipe  # noqa: E402
from launcher.tasks import prepare_task  # noqa: E402
from launcher.tasks.causal_lm.rendering import IGNORE  # noqa: E402


def chat_prompt_completion(assets, tmp_path, **sections):
    """Prompt / completion rows as a user and an assistant turn of the chat template; 1 to 12 trained words."""
    task = {"use_chat_template": True}
    return write_recipe(tmp_path / "sft.yaml", sft_recipe(assets, tmp_path / "unused", "prompt_completion", task=task, **sections))


def launcher_tokens(recipe_path):
    """(real tokens, trained tokens) of the launcher's whole training set."""
    recipe = load_recipe(recipe_path)
    train = prepare_task(recipe, load_tokenizer(recipe.model)).data.train
    return sum(map(len, train["input_ids"])), sum(label != IGNORE for labels in train["labels"] for label in labels[1:])


@pytest.mark.slow  # two TRL trainings of one epoch: 20-30 s on 2 loaded cores
def test_trl_ways_train_the_launchers_tokens_and_padding_free_computes_the_same(assets, tmp_path):
    """One epoch (64 rows, 8 steps) each way. Both TRL ways draw the same batches, so they must agree step by step
    on the real and trained tokens, and padding-free (sdpa on CPU: a block-diagonal mask from the restarting
    positions) must end at the padded way's eval loss to rounding. Over the epoch both see every row, so their
    totals are the launcher's. TRL's `evaluate()` loss is the launcher's (the mean over all trained eval tokens) only
    with the whole eval set in one batch: otherwise it weights each batch's token mean by its examples."""
    recipe_path = chat_prompt_completion(assets, tmp_path, evaluation={"metrics": [], "batch_size": 16})
    padded = run_baseline(load_recipe(recipe_path), "padded", steps=8, out=tmp_path / "padded")
    free = run_baseline(load_recipe(recipe_path, ["evaluation.batch_size=4"]), "padding_free", steps=8, out=tmp_path / "free")
    steps = {way: [r for r in records if r["kind"] == "train"] for way, records in (("padded", padded), ("free", free))}
    assert [r["samples"] for r in steps["padded"]] == [r["samples"] for r in steps["free"]] == [8] * 8
    for key in ("real_tokens", "trained_tokens"):
        assert [r[key] for r in steps["padded"]] == [r[key] for r in steps["free"]]
    assert all(r["padded_tokens"] == r["real_tokens"] for r in steps["free"])
    assert sum(r["padded_tokens"] for r in steps["padded"]) > sum(r["real_tokens"] for r in steps["padded"])
    assert (sum(r["real_tokens"] for r in steps["free"]), sum(r["trained_tokens"] for r in steps["free"])) == launcher_tokens(recipe_path)
    padded_eval, free_eval = padded[-1], free[-1]
    assert free_eval["loss"] == pytest.approx(padded_eval["loss"], rel=1e-4)
    assert padded_eval["trl_eval_loss"] == pytest.approx(padded_eval["loss"], rel=1e-5)
    assert free_eval["trl_eval_loss"] != pytest.approx(free_eval["loss"], rel=1e-3)
    assert padded_eval["examples"] == 16 and padded_eval["rows_over_max_length"] == {"train": 0, "eval": 0}
    assert (padded_eval["pad_to"], free_eval["pad_to"]) == ("batch", "none")


@pytest.mark.slow  # three fresh processes, each importing torch, transformers and TRL
def test_compare_measures_the_trl_baselines_and_the_launcher_on_the_same_samples(assets, tmp_path):
    """A causal_lm recipe gets the TRL baselines instead of the tutorial ones; over one epoch every variant trains
    every row once, so the trained-token counts (the launcher's are its logged loss items) agree."""
    recipe_path = chat_prompt_completion(assets, tmp_path)
    code = compare_main([
        str(recipe_path), "--samples", "64", "--warmup-steps", "0", "--repeats", "1",
        "--variants", "tutorial_dynamic,trl_padded,trl_padding_free,launcher_default",
        "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), "--name", "sft",
    ])
    assert code == 0
    result = json.loads((tmp_path / "results" / "sft.json").read_text())
    assert result["baselines"] == ["trl_padded", "trl_padding_free"], "the classification tutorials do not run on SFT"
    runs = {v["name"]: v["runs"][0] for v in result["variants"]}
    assert list(runs) == ["trl_padded", "trl_padding_free", "launcher_default"]
    real, trained = launcher_tokens(recipe_path)
    for run in runs.values():
        assert run["samples_measured"] == 64
        assert run["real_tokens_per_s"] * run["seconds_measured"] == pytest.approx(real)
        assert run["trained_tokens_per_s"] * run["seconds_measured"] == pytest.approx(trained)
        assert run["eval_examples"] == 16 and run["eval_loss"] > 0.0
    assert runs["trl_padding_free"]["padding_efficiency"] == 1.0 > runs["trl_padded"]["padding_efficiency"]
    launcher = next(v for v in result["variants"] if v["name"] == "launcher_default")
    assert launcher["ratios"]["trl_padded"]["trained_tokens_per_s_x"] == pytest.approx(
        runs["launcher_default"]["trained_tokens_per_s"] / runs["trl_padded"]["trained_tokens_per_s"])
    table = (tmp_path / "results" / "sft.md").read_text()
    assert "| trained tok/s |" in table and "| eval loss |" in table and "| x trl_padding_free |" in table
