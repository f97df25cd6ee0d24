"""Non-finite loss or weights: every rank takes the same action (stop naming the step, or skip the step), and
NaN/inf weights are never checkpointed. A skip changes nothing (weights, optimizer moments, schedule) on one
process and under DDP; under DeepSpeed, which steps inside the backward, `skip` is refused before training. The NaN is real: one vocabulary word's embedding is set to 3e38 (finite,
near float32's max) in a copy of the tiny model, so any example containing it overflows to inf/NaN in the forward."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from builders import FILLER, write_csv
from launching import CPU_DEEPSPEED, launch
from recipes import tiny_recipe, write_recipe
from runs import REPO, run_in_process
from faults import PROCESS_GROUP_LEFT_OPEN, run_faulty, start_ranks, train_records
from launcher.run import main
from launcher.train.checkpoints import CHECKPOINTS
from launcher.train.reporting import METRICS_LOG

SKIP_REFUSED = "training.on_nonfinite_loss=skip cannot skip a step under DeepSpeed"

POISON = "superb"


def poisoned_copy(source, folder, tensor_name: str, row: int, value: float):
    shutil.copytree(source, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights[tensor_name][row] = value
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def poisoned(assets, tmp_path_factory):
    """A model whose POISON embedding overflows, and data where exactly one example (of 32) contains POISON."""
    root = tmp_path_factory.mktemp("poisoned")
    token = AutoTokenizer.from_pretrained(assets["bert_no_dropout"]).convert_tokens_to_ids(POISON)
    model = poisoned_copy(assets["bert_no_dropout"], root / "model", "embeddings.word_embeddings.weight", token, 3e38)
    rows = [{"text": f"{FILLER[i % len(FILLER)]} {FILLER[(i * 7) % len(FILLER)]} good", "label": i % 2} for i in range(32)]
    rows[5]["text"] = f"the film was {POISON}"
    return model, write_csv(root / "train.csv", rows)


def recipe_for(assets, tmp_path, poisoned, output=None, **training):
    model, data = poisoned
    recipe = tiny_recipe(
        assets, tmp_path / "run", data={"train_file": str(data)},
        training={"per_device_batch_size": 4, "max_grad_norm": None, **training},
        output={"save_every_steps": 1, **(output or {})},
    )
    recipe["model"]["name_or_path"] = str(model)
    return write_recipe(tmp_path / "recipe.yaml", recipe)


def nonfinite_step(run_dir) -> int:
    return next(step for step, r in sorted(train_records(run_dir).items()) if r.get("skipped_nonfinite"))


def test_skip_drops_the_step_and_training_goes_on(assets, tmp_path, poisoned):
    recipe = recipe_for(assets, tmp_path, poisoned, on_nonfinite_loss="skip")
    assert run_in_process(recipe) == 0
    records = train_records(tmp_path / "run")
    skipped = [step for step, r in records.items() if r.get("skipped_nonfinite")]
    assert len(skipped) == 2, "the poisoned example is met once per epoch"  # 2 epochs x 8 steps
    assert all(torch.isfinite(w).all() for w in load_file(str(tmp_path / "run" / "model" / "model.safetensors")).values())


def test_stop_names_the_step_and_checkpoints_nothing_after_it(assets, tmp_path, poisoned, capsys):
    skip_run = tmp_path / "skip"
    skip_run.mkdir()
    assert run_in_process(recipe_for(assets, skip_run, poisoned, on_nonfinite_loss="skip", epochs=1)) == 0
    bad_step = nonfinite_step(skip_run / "run")

    assert run_in_process(recipe_for(assets, tmp_path, poisoned, on_nonfinite_loss="stop")) == 1
    error = capsys.readouterr().err
    assert f"non-finite loss nan / grad norm None at optimizer step {bad_step}" in error, error
    saved = sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS).iterdir())
    assert saved[-1] == f"step-{bad_step - 1:08d}" if bad_step > 1 else saved == []


@pytest.mark.slow
def test_all_ranks_stop_at_the_same_step(assets, tmp_path, poisoned):
    """The poisoned example reaches one rank only; the loss is all-reduced, so both ranks stop at one step, and
    close the process group together (a rank exiting with gloo's group open can abort: exit -6, seen in CI)."""
    ranks = start_ranks("none", 0, "all", recipe_for(assets, tmp_path, poisoned, on_nonfinite_loss="stop"))
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 1], outputs[0][-3000:] + outputs[1][-3000:]
    assert not any(PROCESS_GROUP_LEFT_OPEN in out for out in outputs), outputs[0][-3000:]
    errors = [next(line for line in out.splitlines() if line.startswith("error: non-finite loss")) for out in outputs]
    assert errors[0] == errors[1], errors


def test_nonfinite_weights_are_never_checkpointed(assets, tmp_path, capsys):
    """A NaN where the forward never looks (a position beyond max_length) leaves the loss finite: the check
    before each save still refuses, so no checkpoint holds it."""
    model = poisoned_copy(assets["bert_no_dropout"], tmp_path / "model", "embeddings.position_embeddings.weight", 127, float("nan"))
    recipe = tiny_recipe(assets, tmp_path / "run", output={"save_every_steps": 2})
    recipe["model"]["name_or_path"] = str(model)
    assert run_in_process(write_recipe(tmp_path / "recipe.yaml", recipe)) == 1
    assert "weights hold NaN/inf after optimizer step 2; they were not checkpointed" in capsys.readouterr().err
    assert all(r["loss"] == r["loss"] for r in train_records(tmp_path / "run").values()), "the loss stayed finite"
    assert not any((tmp_path / "run" / CHECKPOINTS).glob("step-*"))


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_skipped_step_changes_no_weight_moment_or_schedule(assets, tmp_path, poisoned, processes):
    """One process, or two under DDP (the poisoned example reaches one rank): the checkpoint of the skipped step
    holds exactly what the step before it left."""
    recipe = recipe_for(assets, tmp_path, poisoned, on_nonfinite_loss="skip", output={"keep_last": 20})
    if processes == 1:
        assert run_in_process(recipe) == 0
    else:
        result = run_faulty("none", 0, "all", recipe, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
    records = train_records(tmp_path / "run")
    step = max(step for step, r in records.items() if r.get("skipped_nonfinite"))  # the second epoch's: step > 1
    before, after = (tmp_path / "run" / CHECKPOINTS / f"step-{s:08d}" for s in (step - 1, step))
    weights = [load_file(str(folder / "model.safetensors")) for folder in (before, after)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    optimizers = [torch.load(folder / "optimizer.bin", weights_only=False)["state"] for folder in (before, after)]
    assert all(torch.equal(optimizers[0][p][k], optimizers[1][p][k]) for p in optimizers[0] for k in optimizers[0][p])
    assert records[step]["lr"] == records[step - 1]["lr"]


def test_check_refuses_skip_under_deepspeed_naming_the_fix(assets, tmp_path, poisoned, capsys):
    recipe = str(recipe_for(assets, tmp_path, poisoned, on_nonfinite_loss="skip"))
    assert main([recipe, "--check", "--accelerate-config", str(REPO / "accelerate_configs/zero2.yaml")]) == 1
    error = capsys.readouterr().err
    assert SKIP_REFUSED in error and "training.on_nonfinite_loss=stop" in error, error
    assert main([recipe, "--check", "--accelerate-config", str(REPO / "accelerate_configs/cpu_ddp.yaml")]) == 0


@pytest.mark.slow
def test_deepspeed_launch_refuses_skip_before_training(assets, tmp_path, poisoned):
    """Accelerate's DeepSpeed wrapper steps the engine inside the window's last backward: a skip decided after it
    would keep a NaN update and only hold back the schedule."""
    result = launch("accelerate_configs/zero2.yaml", recipe_for(assets, tmp_path, poisoned, on_nonfinite_loss="skip"),
                    CPU_DEEPSPEED)
    assert result.returncode == 1 and SKIP_REFUSED in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / METRICS_LOG).exists(), "refused before the first step"
