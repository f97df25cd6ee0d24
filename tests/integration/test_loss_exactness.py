"""The loss of an optimizer step is the mean over all loss items of the step (examples, or trained tokens), across
its micro-batches and processes, whatever falls into them: a micro-batch with no trained tokens adds nothing (it is
no NaN), a window with none at all makes no update (it is no error and no non-finite skip), and the examples
Accelerate repeats to give every rank a batch in an epoch's last round (`even_batches`) count nothing.

Tolerance 1e-5 as in test_distributed_runs.py: the runs compared differ only in float32 summation order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launching import CPU_DDP, CPU_DEEPSPEED, launch
from recipes import prepared, sft_recipe, tiny_recipe, write_recipe
from runs import run_in_process
from faults import final_weights, train_records
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.schema import Recipe
from launcher.tasks import prepare_task
from launcher.tasks.causal_lm.rendering import IGNORE
from launcher.tasks.causal_lm.task import CausalLanguageModeling
from launcher.train.checkpoints import CHECKPOINTS

TOLERANCE = 1e-5
COUNTED = torch.tensor([True, True, False, True, False, False])
"""Which of 6 examples a step learns from; the others stand for the repeats of `even_batches`."""


def assert_close_weights(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=TOLERANCE, msg=name)


def sum_and_items(task, model, collate, features, counted):
    batch = collate(features)
    return task.loss(model, batch, counted), task.loss_items(batch, counted)


def assert_counted_examples_only(task, model, collate, features):
    """The batch's loss is the sum of the counted examples' own losses, its items their count; with none counted,
    a loss of 0 that still reaches every weight (a rank holding only repeats joins the gradient all-reduce)."""
    with torch.no_grad():
        whole, items = sum_and_items(task, model, collate, features, COUNTED)
        alone = [sum_and_items(task, model, collate, [f], torch.tensor([True])) for f in features]
    kept = COUNTED.nonzero().flatten().tolist()
    assert whole.item() == pytest.approx(sum(alone[i][0].item() for i in kept), abs=TOLERANCE)
    assert items == sum(alone[i][1] for i in kept) > 0
    nothing, none_counted = sum_and_items(task, model, collate, features, torch.zeros(len(features), dtype=torch.bool))
    assert none_counted == 0 and nothing.item() == 0.0
    nothing.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("padding", ["dynamic", "packed"])
def test_causal_lm_loss_sums_the_trained_tokens_of_the_counted_examples(assets, tmp_path, padding):
    recipe, result = prepared(assets, tmp_path, "prompt_completion", data={"padding": padding})
    task, splits = result.task, result.data
    model, _ = load_model(recipe, task, task.tokenizer)
    assert_counted_examples_only(task, model, task.collators()[0], [splits.train[i] for i in range(6)])


def test_classification_loss_sums_the_counted_examples(assets, tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(assets, tmp_path / "out", model="bert_no_dropout"))
    prepared_task = prepare_task(recipe, load_tokenizer(recipe.model))
    task, splits = prepared_task.task, prepared_task.data
    model, _ = load_model(recipe, task, task.tokenizer)
    assert_counted_examples_only(task, model, task.collators()[0], [splits.train[i] for i in range(6)])


def without_trained_tokens(monkeypatch, positions: set[int]) -> None:
    """The examples at these positions of the epoch's order lose every trained token in their training batch, as
    rows whose trained tokens all fell away would."""
    collators = CausalLanguageModeling.collators

    def blanking_collators(self):
        train, evaluation = collators(self)
        seen = 0

        def collate(features):
            nonlocal seen
            batch = train(features)
            for row in range(len(features)):
                if seen + row in positions:
                    batch["targets"][row] = IGNORE
            seen += len(features)
            return batch

        return collate, evaluation

    monkeypatch.setattr(CausalLanguageModeling, "collators", blanking_collators)


def sft_run(assets, tmp_path: Path, name: str, per_device: int, accumulation: int, **output) -> Path:
    recipe = sft_recipe(assets, tmp_path / name, "prompt_completion",
                        training={"per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                                  "lr": 1e-3, "epochs": 1},
                        evaluation={"before_training": False}, task={"generations": 0}, output=output)
    assert run_in_process(write_recipe(tmp_path / f"{name}.yaml", recipe)) == 0
    return tmp_path / name


def checkpoint_state(run_dir: Path, step: int) -> tuple[dict, dict]:
    folder = run_dir / CHECKPOINTS / f"step-{step:08d}"
    return load_file(folder / "model.safetensors"), torch.load(folder / "optimizer.bin", weights_only=False)


def test_micro_batches_and_windows_without_trained_tokens(assets, tmp_path, monkeypatch):
    """64 examples, 8 steps of 8. Step 1 trains examples 0-3 only (its second micro-batch of 4 has no trained
    token), step 3 none at all: the same as one micro-batch of 8 per step with the same examples emptied, and
    step 3 leaves weights, optimizer state and schedule as step 2 left them."""
    without_trained_tokens(monkeypatch, set(range(4, 8)) | set(range(16, 24)))
    accumulated = sft_run(assets, tmp_path, "accumulated", 4, 2, keep_last=10, save_every_steps=1)
    whole = sft_run(assets, tmp_path, "whole", 8, 1)

    records, reference = train_records(accumulated), train_records(whole)
    assert sorted(records) == sorted(reference) == list(range(1, 9))
    for run in (records, reference):
        assert not any(r.get("skipped_nonfinite") for r in run.values())
        assert run[3]["empty_window"] is True and run[3]["loss"] is None and run[3]["loss_items"] == 0
        assert [step for step, r in run.items() if r.get("empty_window")] == [3]
        assert run[3]["lr"] == run[2]["lr"], "an empty window does not advance the schedule"
    assert [records[s]["loss_items"] for s in records] == [reference[s]["loss_items"] for s in reference]
    losses = [records[s]["loss"] for s in records if s != 3]
    assert losses == pytest.approx([reference[s]["loss"] for s in reference if s != 3], rel=0, abs=TOLERANCE)
    assert_close_weights(final_weights(whole), final_weights(accumulated))

    (weights_2, optimizer_2), (weights_3, optimizer_3) = checkpoint_state(accumulated, 2), checkpoint_state(accumulated, 3)
    assert all(torch.equal(weights_2[name], weights_3[name]) for name in weights_2)
    moments = lambda state: [t for s in state["state"].values() for t in s.values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(optimizer_2), moments(optimizer_3)))


# 17 examples in micro-batches of 2 on 2 processes: 9 batches, so rank 1's 5th is all repeats and rank 0's 5th has
# one, and the epoch's last window holds one micro-batch instead of 2. The reference is one process at the same
# global batch (2 x 4 accumulation), whose last micro-batch is the single example 16.
EXAMPLES = 17


def uneven_recipe(assets_or_model: dict, out: Path, task: str, per_device: int, accumulation: int) -> dict:
    training = {"per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation, "lr": 1e-3,
                "epochs": 2, "max_grad_norm": 1.0}
    if task == "sft":
        return sft_recipe(assets_or_model, out, "prompt_completion", training=training,
                          data={"train_samples": EXAMPLES}, evaluation={"before_training": False},
                          task={"generations": 0}, output={"save_every_epoch": False})
    return tiny_recipe(assets_or_model, out, model="start", data={"train_samples": EXAMPLES}, training=training,
                       output={"save_every_epoch": False})


@pytest.mark.slow
@pytest.mark.parametrize(("task", "config", "env"), [("sft", "cpu_ddp.yaml", CPU_DDP), ("classification", "zero2.yaml", CPU_DEEPSPEED)])
def test_repeats_of_an_uneven_last_round_count_nothing(assets, start_model, tmp_path, task, config, env):  # noqa: F811
    one = write_recipe(tmp_path / "one.yaml", uneven_recipe(start_model, tmp_path / "one", task, 2, 4))
    assert run_in_process(one) == 0
    two = write_recipe(tmp_path / "two.yaml", uneven_recipe(start_model, tmp_path / "two", task, 2, 2))
    result = launch(f"accelerate_configs/{config}", two, env)
    assert result.returncode == 0, result.stderr[-3000:]

    expected, got = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    assert [got[s]["samples"] for s in got] == [expected[s]["samples"] for s in expected] == [8, 8, 1] * 2
    assert [got[s]["loss_items"] for s in got] == [expected[s]["loss_items"] for s in expected]
    assert [got[s]["loss"] for s in got] == pytest.approx([expected[s]["loss"] for s in expected], rel=0, abs=TOLERANCE)
    assert_close_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
