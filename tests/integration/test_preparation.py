"""Data prepared once under its cache key and read back by every later process: the same tokens as preparing
afresh, a hit for a second run or another process, a miss for anything the key depends on, tokenizing
processes, and no rank timing out while another tokenizes."""

from __future__ import annotations

import json
import os
import time

import pytest

from builders import sentiment_rows, write_csv
from faults import run_faulty, train_records
from recipes import tiny_recipe, write_recipe
from runs import run_in_process
from launcher.data.loaders import token_lengths
from launcher.data.preparation import READY_MARKER, MapPlan, cache_key
from launcher.model.loading import load_tokenizer
from launcher.recipe.loading import load_recipe
from launcher.tasks import prepare_task, prepare_task_once


def recipe_of(assets, tmp_path, **data):
    raw = tiny_recipe(assets, tmp_path / "run", data={"cache_dir": str(tmp_path / "cache"), **data})
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", raw))


def columns(dataset) -> dict:
    return {name: dataset[name][:] for name in dataset.column_names}


def test_a_second_preparation_reads_back_what_the_first_wrote(assets, tmp_path):
    recipe = recipe_of(assets, tmp_path)
    tokenizer = load_tokenizer(recipe.model)
    first, cold = prepare_task_once(recipe, tokenizer)
    second, warm = prepare_task_once(recipe, tokenizer)
    fresh = prepare_task(recipe, tokenizer)  # no cache at all
    assert (cold.hit, warm.hit) == (False, True)
    assert cold.key == warm.key and (cold.folder / READY_MARKER).is_file()
    assert "cache hit" in warm.note() and cold.key in warm.note()
    for split in ("train", "eval"):
        assert columns(getattr(second.data, split)) == columns(getattr(fresh.data, split)) == columns(getattr(first.data, split))
    # read back from the key's folder, not recomputed in memory
    assert all(str(cold.folder) in f["filename"] for f in second.data.train.cache_files)
    assert second.task.labels == fresh.task.labels


@pytest.mark.parametrize("change", [
    {"max_length": 32},
    {"text_field": "other"},
    "edited file",
    "task",
    "tokenizer",
])
def test_the_key_changes_with_what_the_prepared_splits_depend_on(assets, tmp_path, change):
    train = write_csv(tmp_path / "train.csv", [{**row, "other": row["text"].upper()} for row in sentiment_rows(16, seed=9)])
    recipe = recipe_of(assets, tmp_path, train_file=str(train))
    tokenizer = load_tokenizer(recipe.model)
    before = cache_key(recipe, tokenizer)
    if change == "edited file":
        time.sleep(0.01)
        write_csv(train, sentiment_rows(16, seed=10))
    elif change == "task":
        recipe = recipe.model_copy(update={"task": recipe.task.model_copy(update={"num_labels": 3})})
    elif change == "tokenizer":
        tokenizer.add_tokens(["zzzz"])
    else:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update=change)})
    assert cache_key(recipe, tokenizer) != before


def test_what_only_the_loaders_read_leaves_the_key_alone(assets, tmp_path):
    recipe = recipe_of(assets, tmp_path)
    tokenizer = load_tokenizer(recipe.model)
    other = recipe.model_copy(update={
        "data": recipe.data.model_copy(update={"num_workers": 2, "num_proc": 3, "group_by_length": True}),
        "training": recipe.training.model_copy(update={"lr": 0.5, "epochs": 7}),
    })
    assert cache_key(other, tokenizer) == cache_key(recipe, tokenizer)


def test_several_tokenizing_processes_give_the_same_splits(assets, tmp_path):
    recipe = recipe_of(assets, tmp_path)
    tokenizer = load_tokenizer(recipe.model)
    one = prepare_task(recipe, tokenizer)
    two = prepare_task(recipe, tokenizer, map_plan=MapPlan(tmp_path / "two", num_proc=2))
    assert columns(two.data.train) == columns(one.data.train)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("tokenized"))[0].endswith("_of_00002.arrow")


def test_default_processes_follow_rows_and_cores(monkeypatch):
    monkeypatch.setattr("launcher.data.preparation.usable_cores", lambda: 4)
    plan = MapPlan()
    assert plan.processes(9_999) is None            # small sets tokenize in-process
    assert plan.processes(25_000) == 2
    assert plan.processes(650_000) == 4
    assert MapPlan(num_proc=3).processes(10) == 3   # the recipe's choice wins


def test_token_lengths_are_read_from_arrow(assets, tmp_path):
    recipe = recipe_of(assets, tmp_path)
    tokenized = prepare_task(recipe, load_tokenizer(recipe.model)).data.train
    assert token_lengths(tokenized, rows_per_read=7).tolist() == [len(ids) for ids in tokenized["input_ids"]]
    subset = tokenized.select([5, 0, 3])
    assert token_lengths(subset).tolist() == [len(ids) for ids in subset["input_ids"]]


def test_a_run_and_its_check_share_the_preparation(assets, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        assets, tmp_path / "run", data={"cache_dir": str(tmp_path / "cache")}, training={"epochs": 1}))
    assert run_in_process(recipe, "--check") == 0
    assert "data: prepared in" in capsys.readouterr().out
    assert run_in_process(recipe) == 0
    assert "data: reused (cache hit)" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_start_from_a_cold_cache_while_preparation_outlasts_the_collective_timeout(assets, tmp_path):
    """Whichever rank prepares takes 15 s longer than usual; the other waits on the file lock, not in a
    collective bounded by the 10 s `training.collective_timeout_s`, so nobody times out."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        assets, tmp_path / "run", data={"cache_dir": str(tmp_path / "cache")},
        training={"epochs": 1, "collective_timeout_s": 10}))
    started = time.monotonic()
    result = run_faulty("slow_prepare", 15, "all", recipe, processes=2)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert time.monotonic() - started >= 15
    # rank 0 prints the plan: it prepared, or it waited for rank 1 and read back
    assert "data: prepared in" in result.stdout or "data: reused (cache hit)" in result.stdout, result.stdout[-3000:]
    assert train_records(tmp_path / "run")
    markers = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob(f"*/{READY_MARKER}")]
    assert len(markers) == 1, os.listdir(tmp_path / "cache")


def test_prepare_command_fills_the_cache_and_reports_the_splits(assets, tmp_path, capsys):
    from launcher.prepare import main as prepare

    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        assets, tmp_path / "run", data={"cache_dir": str(tmp_path / "cache"), "max_length": 16}))
    assert prepare([str(recipe)]) == 0
    out = capsys.readouterr().out
    lengths = token_lengths(prepare_task(load_recipe(recipe), load_tokenizer(load_recipe(recipe).model)).data.train)
    assert "data: prepared in" in out
    train = next(line for line in out.splitlines() if line.startswith("train"))
    assert f"{len(lengths)} rows" in train and f"{sum(lengths):,} tokens" in train
    assert f"max {max(lengths)}; {sum(n >= 16 for n in lengths)} at max_length 16" in train
    assert out.count("\neval ") == 1
    assert prepare([str(recipe), "data.max_length=16"]) == 0 and "cache hit" in capsys.readouterr().out
    assert prepare([str(recipe), "data.text_field=nope"]) == 1
    assert "missing column(s) ['nope']" in capsys.readouterr().err
