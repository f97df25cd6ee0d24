"""Preference tuning (`task.type: reward` and `dpo`) on a tiny chat Llama: pairs read from text and from chat
messages alike, only the answers trained, bad rows named by file, row and column, long prompts shortened before a
pair is dropped, both losses against their formulas and exact across micro-batches, the LoRA reference equal to
the starting model, export and reload, exact resume after kill -9, two processes equal to one, and the schema."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from builders import preference_rows, write_jsonl
from faults import assert_same_weights, final_weights, run_faulty, train_records
from launching import CPU_DDP, CPU_DEEPSPEED, launch
from recipes import preference_recipe, write_recipe
from runs import run_in_process
from launcher.data.sources import DataError
from launcher.model.loading import load_model, load_tokenizer
from launcher.predict import main as predict_main
from launcher.recipe.loading import RecipeError, load_recipe
from launcher.recipe.schema import Recipe
from launcher.tasks import prepare_task
from launcher.tasks.causal_lm.rendering import IGNORE
from launcher.train.reporting import read_metrics_log

CHAT_FORMS = {
    "text": {},
    "chat messages": {"prompt_field": "chat_prompt", "chosen_field": "chat_chosen", "rejected_field": "chat_rejected"},
    "whole conversations": {"prompt_field": None, "chosen_field": "conversation_chosen",
                            "rejected_field": "conversation_rejected"},
}


def prepare(assets, tmp_path, task_type: str = "dpo", **sections):
    recipe = Recipe.model_validate(preference_recipe(assets, tmp_path / "out", task_type, **sections))
    return recipe, prepare_task(recipe, load_tokenizer(recipe.model))


def pairs_file(tmp_path, rows, name="pairs.jsonl"):
    return str(write_jsonl(tmp_path / name, rows))


@pytest.mark.parametrize("form", CHAT_FORMS)
def test_text_and_chat_pairs_become_the_same_tokens_with_only_the_answers_trained(assets, tmp_path, form):
    _, text = prepare(assets, tmp_path / "text")
    _, other = prepare(assets, tmp_path / "other", task=CHAT_FORMS[form])
    tokenizer = text.task.tokenizer
    rows = [json.loads(line) for line in assets["pairs_train"].read_text().splitlines()]
    for row, example, same in zip(rows, text.data.train, other.data.train):
        assert same == example
        for side in ("chosen", "rejected"):
            ids, labels = (example[f"{side}_{name}" if side == "rejected" else name] for name in ("input_ids", "labels"))
            assert tokenizer.decode([t for t in labels if t != IGNORE]) == row[side] + " <|end|>"
            assert tokenizer.decode(ids).startswith(f"<|user|> {row['prompt']} <|end|> <|assistant|>")


@pytest.mark.parametrize(("change", "message"), [
    ({"rejected": None}, "row 1: column 'rejected' is empty or neither text nor a list of chat messages"),
    ({"chosen": "  "}, "row 1: column 'chosen' is empty"),
    ({"rejected": "x"}, None),  # a valid row: the control
    ({"rejected": "{chosen}"}, "row 1: columns 'chosen' and 'rejected' are identical"),
    ({"chosen": [{"role": "assistant"}]}, "row 1: column 'chosen': message 0 (assistant) has empty or non-text content"),
    ({"chosen": [{"role": "robot", "content": "hi"}]}, "row 1: column 'chosen': message 0 has unknown role 'robot'"),
    ({"chosen": [{"role": "assistant", "content": "good"}]}, "row 1: columns 'chosen' and 'rejected' must both be text or both be chat messages"),
    ({"margin": "high"}, "row 1: column 'margin' must be a finite number"),
])
def test_bad_pairs_are_named_by_file_row_and_column(assets, tmp_path, change, message):
    rows = preference_rows(4, seed=9)
    rows[1] |= {key: value.format(**rows[1]) if isinstance(value, str) else value for key, value in change.items()}
    train = pairs_file(tmp_path, rows)
    sections = {"data": {"train_file": train, "eval_file": None}, "task": {"margin_field": "margin"}}
    if message is None:
        prepare(assets, tmp_path, **sections)
        return
    with pytest.raises(DataError, match=f"{train} {message}".replace("(", r"\(").replace(")", r"\)")):
        prepare(assets, tmp_path, **sections)


def test_long_prompts_are_shortened_and_pairs_whose_answers_do_not_fit_dropped_or_refused(assets, tmp_path):
    rows = preference_rows(6, seed=10)
    rows[0]["prompt"] = " ".join(["film"] * 60) + " the plot"  # shortened at its start: its end stays
    rows[1]["chosen"] = " ".join(["good"] * 40)  # 40 answer tokens: does not fit with any prompt
    data = {"train_file": pairs_file(tmp_path, rows), "eval_file": None, "max_length": 32}
    _, result = prepare(assets, tmp_path, data=data)
    assert len(result.data.train) == 5
    assert any("shortened the prompt of 1 of 6 pairs at its start" in note for note in result.notes)
    assert any("dropped 1 of 6 pairs" in note for note in result.notes)
    shortened = result.task.tokenizer.decode(result.data.train[0]["input_ids"])
    assert len(result.data.train[0]["input_ids"]) <= 32 and "film the plot <|end|>" in shortened
    assert shortened.endswith(rows[0]["chosen"] + " <|end|>")
    with pytest.raises(DataError, match=r"rows \[1\]: answers do not fit data.max_length=32"):
        prepare(assets, tmp_path, data=data, task={"on_truncated": "fail"})


def rewards_of(model, batch) -> torch.Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return model(input_ids=ids.flatten(0, 1), attention_mask=mask.flatten(0, 1)).logits.view(-1, 2)


def test_reward_loss_is_the_pairwise_logistic_loss_with_margin_and_centring(assets, tmp_path):
    recipe, result = prepare(assets, tmp_path, "reward", task={"margin_field": "margin", "center_rewards_coefficient": 0.01})
    task = result.task
    model, _ = load_model(recipe, task, task.tokenizer)
    batch = task.collators()[0]([result.data.train[i] for i in range(4)])
    counted = torch.tensor([True, True, False, True])
    rewards = rewards_of(model, batch)
    expected = (-F.logsigmoid(rewards[:, 0] - rewards[:, 1] - batch["margin"]) + 0.01 * (rewards[:, 0] + rewards[:, 1]) ** 2)
    torch.testing.assert_close(task.loss(model, batch, counted), expected[counted].sum())
    assert task.loss_items(batch, counted) == 3


def full_logprobs(model, ids, mask, targets) -> torch.Tensor:
    """Each row's summed log-prob of its targets from the full logits (what TRL computes)."""
    logprobs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != IGNORE)).sum(-1)


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_loss_matches_its_formula_and_the_reference_is_the_starting_model(assets, tmp_path, lora):
    recipe, result = prepare(assets, tmp_path, "dpo", lora={"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
                             task={"beta": 0.5})
    task = result.task
    model, _ = load_model(recipe, task, task.tokenizer)
    start = AutoModelForCausalLM.from_pretrained(assets["chat_llama"])
    batch = task.collators()[0]([result.data.train[i] for i in range(4)])
    rows = [batch[name].flatten(0, 1) for name in ("input_ids", "attention_mask", "pair_targets")]
    counted = torch.ones(4, dtype=torch.bool)
    assert task.loss(model, batch, counted).item() == pytest.approx(4 * torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    with torch.no_grad():  # move the policy away from the start; the reference must stay where it was
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    out = task.logprobs(model, batch)
    policy = model.get_base_model() if lora else model
    torch.testing.assert_close(out.reference.flatten(), full_logprobs(start, *rows), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.policy.flatten(), full_logprobs(policy, *rows), rtol=0, atol=1e-4)
    ratios = (out.policy - out.reference).detach()
    expected = -F.logsigmoid(0.5 * (ratios[:, 0] - ratios[:, 1]))
    torch.testing.assert_close(task.loss(model, batch, counted), expected.sum(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("task_type", ["reward", "dpo"])
def test_step_loss_is_the_mean_over_the_pairs_of_the_step(assets, tmp_path, task_type):
    def run(name, per_device, accumulation):
        recipe = preference_recipe(assets, tmp_path / name, task_type, training={
            "epochs": 1, "per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation, "lr": 1e-3},
            evaluation={"before_training": False}, task={"generations": 0} if task_type == "dpo" else {})
        assert run_in_process(write_recipe(tmp_path / f"{name}.yaml", recipe)) == 0
        return tmp_path / name

    whole, accumulated = run("whole", 8, 1), run("accumulated", 2, 4)
    losses = lambda folder: [r["loss"] for r in read_metrics_log(folder) if r["kind"] == "train"]  # noqa: E731
    assert losses(accumulated) == pytest.approx(losses(whole), abs=1e-5)
    expected, got = final_weights(whole), final_weights(accumulated)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_reward_model_learns_exports_and_scores_as_it_evaluated(assets, tmp_path):
    """Scored on its training pairs: 48 pairs are too few for the tiny model to generalize a reward that compares
    the answer's sentiment with the prompt's (the SmolLM2 demo measures held-out accuracy)."""
    data = {"eval_file": str(assets["pairs_train"])}
    recipe = preference_recipe(assets, tmp_path / "run", "reward", data=data, training={"epochs": 6, "lr": 1e-2})
    assert run_in_process(write_recipe(tmp_path / "r.yaml", recipe)) == 0
    evals = [r for r in read_metrics_log(tmp_path / "run") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["accuracy"] >= 0.8 > evals[0]["accuracy"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.2 and evals[-1]["margin"] > 1
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model").eval()
    assert exported.config.num_labels == 1 and exported.config.id2label == {0: "reward"}
    _, result = prepare(assets, tmp_path / "again", "reward", data=data)
    batch = result.task.collators()[1]([result.data.eval[i] for i in range(len(result.data.eval))])
    with torch.no_grad():
        rewards = rewards_of(exported, batch)
    assert float((rewards[:, 0] > rewards[:, 1]).double().mean()) == pytest.approx(evals[-1]["accuracy"])
    assert float(rewards.mean()) == pytest.approx(evals[-1]["reward_mean"], abs=1e-5)

    # predict: a file of pairs (evaluated as the run evaluated it), then the same answers one per row
    assert predict_main([str(tmp_path / "run"), "--input", str(assets["pairs_train"]), "--evaluate",
                         "--output", str(tmp_path / "pairs.jsonl")]) == 0
    metrics = json.loads((tmp_path / "pairs.metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(evals[-1]["accuracy"]) and metrics["examples"] == 48
    assert metrics["loss"] == pytest.approx(evals[-1]["loss"], abs=1e-5)
    scored = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert all(row["prefers_chosen"] == (row["reward_chosen"] > row["reward_rejected"]) for row in scored)
    singles = write_jsonl(tmp_path / "answers.jsonl", [{"prompt": row["prompt"], "chosen": row["chosen"]} for row in scored])
    assert predict_main([str(tmp_path / "run"), "--input", str(singles), "--output", str(tmp_path / "single.jsonl")]) == 0
    single = [json.loads(line)["reward"] for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    assert single == pytest.approx([row["reward_chosen"] for row in scored], abs=1e-5)
    assert predict_main([str(tmp_path / "run"), "--input", str(singles), "--evaluate"]) == 1  # pairs needed


def test_dpo_with_lora_learns_generates_and_exports_adapter_and_merged_model(assets, tmp_path):
    from peft import AutoPeftModelForCausalLM

    recipe = preference_recipe(assets, tmp_path / "run", "dpo", training={"epochs": 6, "lr": 1e-2},
                               lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge_on_save": True})
    assert run_in_process(write_recipe(tmp_path / "r.yaml", recipe)) == 0
    evals = [r for r in read_metrics_log(tmp_path / "run") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and evals[0]["accuracy"] == 0
    assert evals[-1]["accuracy"] >= 0.75 and evals[-1]["loss"] < 0.68 and evals[-1]["margin"] > 0.03
    generations = sorted((tmp_path / "run" / "generations").iterdir())
    assert len(generations) == len(evals)
    first = json.loads(generations[0].read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected", "generated"} and first["prompt"].endswith("<|assistant|> ")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("task_type", ["reward", "dpo"])
def test_kill9_then_resume_is_bit_identical(assets, tmp_path, task_type):
    def recipe_file(folder):
        folder.mkdir()
        recipe = preference_recipe(assets, folder / "run", task_type, training={"epochs": 2, "lr": 1e-3},
                                   output={"save_every_steps": 4}, evaluation={"before_training": False})
        return write_recipe(folder / "recipe.yaml", recipe)

    reference = recipe_file(tmp_path / "reference")
    assert run_in_process(reference) == 0
    resumed = recipe_file(tmp_path / "resumed")
    assert run_faulty("kill", 6, "0", resumed).returncode == -9  # mid-epoch: 12 steps an epoch
    assert run_in_process(resumed, "output.resume_from=auto") == 0
    expected, got = train_records(tmp_path / "reference" / "run"), train_records(tmp_path / "resumed" / "run")
    assert [got[s]["loss"] for s in sorted(expected)] == [expected[s]["loss"] for s in sorted(expected)]
    assert_same_weights(final_weights(tmp_path / "reference" / "run"), final_weights(tmp_path / "resumed" / "run"))


@pytest.fixture(scope="module")
def one_process_runs(assets, tmp_path_factory):
    """One process at the global batch of the two-process runs (8 pairs a step), per task type."""
    runs = {}
    for task_type in ("reward", "dpo"):
        folder = tmp_path_factory.mktemp(f"one_process_{task_type}")
        recipe = preference_recipe(assets, folder / "run", task_type, training={"epochs": 1, "lr": 1e-3, "per_device_batch_size": 8},
                                   evaluation={"before_training": False})
        assert run_in_process(write_recipe(folder / "r.yaml", recipe)) == 0
        runs[task_type] = folder / "run"
    return runs


# DPO without LoRA under ZeRO-3 is refused (test_dpo_reference_copy_is_refused_where_it_would_need_sharding); with
# LoRA it has its own test below.
@pytest.mark.slow
@pytest.mark.parametrize(("task_type", "config", "env", "per_device", "accumulation"), [
    ("reward", "cpu_ddp.yaml", CPU_DDP, 2, 2), ("reward", "zero2.yaml", CPU_DEEPSPEED, 2, 2),
    ("reward", "zero3.yaml", CPU_DEEPSPEED, 4, 1), ("dpo", "cpu_ddp.yaml", CPU_DDP, 2, 2),
    ("dpo", "zero2.yaml", CPU_DEEPSPEED, 2, 2),
])
def test_two_processes_train_the_one_process_model(assets, tmp_path, one_process_runs, task_type, config, env, per_device, accumulation):
    recipe = preference_recipe(assets, tmp_path / "run", task_type, evaluation={"before_training": False}, training={
        "epochs": 1, "lr": 1e-3, "per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation})
    result = launch(f"accelerate_configs/{config}", write_recipe(tmp_path / "r.yaml", recipe), env)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = lambda run: [r["loss"] for r in read_metrics_log(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "run") == pytest.approx(losses(one_process_runs[task_type]), abs=1e-5)
    expected, got = final_weights(one_process_runs[task_type]), final_weights(tmp_path / "run")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_dpo_with_lora_under_zero3_matches_one_process(assets, tmp_path):
    """The LoRA reference (adapters disabled) under ZeRO-3, where every forward gathers the sharded layers."""
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}

    def recipe(folder, per_device):
        return write_recipe(tmp_path / f"{folder}.yaml", preference_recipe(
            assets, tmp_path / folder, "dpo", lora=lora, evaluation={"before_training": False},
            training={"epochs": 1, "lr": 1e-2, "per_device_batch_size": per_device}))

    assert run_in_process(recipe("one", 8)) == 0
    result = launch("accelerate_configs/zero3.yaml", recipe("zero3", 4), CPU_DEEPSPEED)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = lambda run: [r["loss"] for r in read_metrics_log(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "zero3") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    adapter = lambda run: load_file(str(run / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    expected, got = adapter(tmp_path / "one"), adapter(tmp_path / "zero3")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_dpo_reference_copy_is_refused_where_it_would_need_sharding(assets, tmp_path):
    recipe = preference_recipe(assets, tmp_path / "run", "dpo", training={"per_device_batch_size": 4})
    result = launch("accelerate_configs/zero3.yaml", write_recipe(tmp_path / "r.yaml", recipe), CPU_DEEPSPEED)
    assert result.returncode == 1
    assert "task.type dpo without LoRA keeps a frozen copy" in result.stderr


@pytest.mark.parametrize(("change", "fragment"), [
    ({"task": {"type": "dpo", "chosen_feild": "x"}}, "task.chosen_feild: unknown key; did you mean 'chosen_field'?"),
    ({"task": {"type": "reward", "rejected": "x"}}, "task.rejected: unknown key; did you mean 'rejected_field'?"),
    ({"task": {"type": "reward", "beta": 0.1}}, "task.beta: unknown key"),
    ({"task": {"type": "dpo", "loss_type": "ipo"}}, "task.loss_type: Input should be 'sigmoid' or 'hinge'"),
    ({"evaluation": {"metrics": ["f1"]}}, "evaluation.metrics ['f1']: task.type dpo reports its own"),
    ({"data": {"padding": "packed"}}, "data.padding packed: task.type dpo pads each pair's two answers side by side"),
    ({"data": {"text_pair_field": "other"}}, "data.text_pair_field apply to labelled data"),
])
def test_recipe_rules_of_the_pair_tasks(assets, tmp_path, change, fragment):
    recipe = preference_recipe(assets, tmp_path / "run", "dpo")
    for section, values in change.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert fragment in str(err.value)
