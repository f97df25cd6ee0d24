"""Generative fine-tuning (`task.type: causal_lm`) on a tiny chat Llama: the three data formats end to end, which
tokens are trained, the loss as the mean over a step's trained tokens, packed rows that keep examples apart, bad
rows named by file and row, and the schema rules of the task union."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from builders import sft_rows, write_jsonl
from launching import CPU_DDP, CPU_DEEPSPEED, launch
from recipes import FORMATS, prepared, sft_recipe, write_recipe
from runs import run_in_process
from faults import assert_same_weights, final_weights, run_faulty, train_records
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.loading import RecipeError, load_recipe
from launcher.recipe.schema import Recipe
from launcher.data.sources import DataError
from launcher.tasks import prepare_task
from launcher.tasks.causal_lm.rendering import IGNORE
from launcher.tasks.causal_lm.batches import packed_sft_batch
from launcher.train.reporting import read_metrics_log

@pytest.mark.parametrize("fmt", FORMATS)
def test_only_the_answer_part_is_trained(assets, tmp_path, fmt):
    _, result = prepared(assets, tmp_path, fmt)
    tokenizer, splits = result.task.tokenizer, result.data
    rows = [json.loads(line) for line in Path(assets["sft_train"]).read_text().splitlines()]
    for row, example in zip(rows, splits.train):
        trained = tokenizer.decode([t for t in example["labels"] if t != IGNORE])
        answer = {"chat": row["completion"].strip() + " <|end|>", "prompt_completion": row["completion"].strip() + " </s>",
                  "labelled": ("good" if row["label"] == "positive" else "bad") + " <|end|>"}[fmt]
        assert trained == answer


def test_chat_template_from_the_recipe_is_used_and_exported(assets, tmp_path):
    plain = tmp_path / "plain"
    tokenizer = AutoTokenizer.from_pretrained(assets["chat_llama"])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    AutoModelForCausalLM.from_pretrained(assets["chat_llama"]).save_pretrained(plain)
    recipe = sft_recipe(assets, tmp_path / "out", "chat", model={"name_or_path": str(plain)})
    with pytest.raises(DataError, match="no chat template; give one in task.chat_template"):
        prepare_task(Recipe.model_validate(recipe), load_tokenizer(Recipe.model_validate(recipe).model))
    recipe["task"]["chat_template"] = AutoTokenizer.from_pretrained(assets["chat_llama"]).chat_template
    assert run_in_process(write_recipe(tmp_path / "r.yaml", recipe)) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "model").chat_template == recipe["task"]["chat_template"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_evaluates_generates_and_exports(assets, tmp_path, fmt):
    recipe = write_recipe(tmp_path / "r.yaml", sft_recipe(assets, tmp_path / "out", fmt, training={"epochs": 6}))
    assert run_in_process(recipe) == 0
    evals = [r for r in read_metrics_log(tmp_path / "out") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0  # before training: what fine-tuning bought
    assert evals[-1]["loss"] < evals[0]["loss"] * 0.75  # completions are random words of one sentiment: ln 8 at best
    assert evals[-1]["perplexity"] == pytest.approx(torch.tensor(evals[-1]["loss"]).exp().item(), rel=1e-6)
    if fmt == "labelled":
        assert evals[-1]["accuracy"] >= 0.9 and evals[-1]["examples"] == 16
    generations = sorted((tmp_path / "out" / "generations").glob("step-*.jsonl"))
    assert [p.name for p in generations][0] == "step-00000000.jsonl" and len(generations) == 7
    assert [set(json.loads(line)) for line in generations[-1].read_text().splitlines()] == [{"prompt", "reference", "generated"}] * 2

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "the film was great"}], add_generation_prompt=True,
                                           tokenize=False)
    output = model.generate(**tokenizer(prompt, add_special_tokens=False, return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert output.shape[1] > len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_lora_sft_exports_adapter_and_merged_model(assets, tmp_path):
    from peft import AutoPeftModelForCausalLM

    recipe = sft_recipe(assets, tmp_path / "out", "labelled",
                        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge_on_save": True})
    assert run_in_process(write_recipe(tmp_path / "r.yaml", recipe)) == 0
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)


def steps_of(assets, tmp_path, name: str, per_device: int, accumulation: int) -> Path:
    recipe = sft_recipe(assets, tmp_path / name, "prompt_completion",
                        training={"per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                                  "lr": 1e-3, "epochs": 1},
                        evaluation={"before_training": False}, task={"generations": 0})
    assert run_in_process(write_recipe(tmp_path / f"{name}.yaml", recipe)) == 0
    return tmp_path / name


def test_step_loss_is_the_mean_over_all_trained_tokens_of_the_step(assets, tmp_path):
    """Completions of 1, 2 and 12 words: a mean of per-micro-batch means would weigh a token of a short batch more
    and move the weights far past the tolerance (measured: about 1e-3 after 8 steps)."""
    whole = steps_of(assets, tmp_path, "whole", 8, 1)
    accumulated = steps_of(assets, tmp_path, "accumulated", 2, 4)
    losses = lambda run: [r["loss"] for r in read_metrics_log(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(accumulated) == pytest.approx(losses(whole), abs=1e-5)
    trained = [r["loss_items"] for r in read_metrics_log(whole) if r["kind"] == "train"]
    assert len(set(trained)) > 1 and trained == [r["loss_items"] for r in read_metrics_log(accumulated) if r["kind"] == "train"]
    expected, got = final_weights(whole), final_weights(accumulated)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_packed_rows_keep_examples_apart(assets, tmp_path):
    """Each example's per-token losses in a packed row equal its own unpadded forward's."""
    recipe, result = prepared(assets, tmp_path, "prompt_completion", data={"padding": "packed"})
    task, splits = result.task, result.data
    model = load_model(recipe, task, task.tokenizer)[0].eval()
    train_collate, _ = task.collators()
    assert train_collate is packed_sft_batch
    features = [splits.train[i] for i in range(6)]
    with torch.no_grad():
        packed = model(**packed_sft_batch(features))
        alone = [model(**packed_sft_batch([f])) for f in features]
    torch.testing.assert_close(packed.token_losses, torch.cat([a.token_losses for a in alone]), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.logits, torch.cat([a.logits for a in alone]), rtol=0, atol=1e-5)
    assert packed.loss.item() == pytest.approx(torch.cat([a.token_losses for a in alone]).sum().item(), abs=1e-4)


@pytest.mark.parametrize(
    ("fmt", "row", "message"),
    [
        ("chat", {"messages": "hello"}, "messages must be a non-empty list"),
        ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ("prompt_completion", {"prompt": "good film", "completion": " "}, "column 'completion' is empty or not text"),
        ("labelled", {"prompt": "good film", "label": "neutral"}, "has labels ['neutral'] not in data.label_names"),
    ],
)
def test_bad_rows_are_named_by_file_row_and_column(assets, tmp_path, fmt, row, message):
    good = sft_rows(3, seed=9)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*good, {**good[0], **row}])
    recipe = Recipe.model_validate(sft_recipe(assets, tmp_path / "out", fmt, data={"train_file": str(bad)}))
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        prepare_task(recipe, load_tokenizer(recipe.model))
    assert str(bad) in str(caught.value)
    if fmt != "labelled":
        assert "row 3" in str(caught.value)


def test_label_without_a_label_word_is_an_error(assets, tmp_path):
    rows = [{"prompt": "good film", "label": i % 3} for i in range(6)]
    ids = write_jsonl(tmp_path / "ids.jsonl", rows)
    recipe = Recipe.model_validate(sft_recipe(assets, tmp_path / "out", "labelled",
                                              data={"train_file": str(ids), "eval_file": None, "label_names": None}))
    with pytest.raises(DataError, match="row 2: column 'label' holds 2, which has no label word"):
        prepare_task(recipe, load_tokenizer(recipe.model))


def test_truncated_answers_are_dropped_and_counted_or_refused(assets, tmp_path):
    _, result = prepared(assets, tmp_path, "chat", data={"max_length": 9})
    dropped = [n for n in result.notes if "dropped" in n]
    assert len(dropped) == 2 and len(result.data.train) < 64
    with pytest.raises(DataError, match="lose every trained token"):
        prepared(assets, tmp_path, "chat", data={"max_length": 9}, task={"on_truncated": "fail"})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"task": {"num_labels": 2, "type": "causal_lm", "format": "chat"}}, "task.num_labels: unknown key"),
        ({"task": {"type": "causal_lm", "format": "chat", "prompt_template": "{text}"}}, "prompt_template do(es) not apply to format 'chat'"),
        ({"task": {"type": "causal_lm", "format": "labelled", "prompt_template": "no slot"}}, "needs a prompt_template with {text}"),
        ({"task": {"type": "causal_lm", "format": "chat"}, "evaluation": {"metrics": ["accuracy"]}}, "need labels"),
        ({"task": {"type": "causal_lm", "format": "chta"}}, "task.format:"),
        ({"task": {"type": "causal_lm", "format": "chat", "generation": 3}}, "did you mean 'generations'"),
        ({"task": {"type": "generate"}}, "task.type: 'generate' is not a task type; one of sequence_classification, causal_lm"),
        ({"task": {"format": "chat"}}, "task.type: required key is missing"),
    ],
)
def test_task_fields_belong_to_their_type_and_format(tmp_path, change, fragment):
    recipe = {"model": {"name_or_path": "x"}, "data": {"dataset": "d"}, "output": {"dir": "o"}, **change}
    problems = pytest.raises(RecipeError, load_recipe, write_recipe(tmp_path / "r.yaml", recipe)).value.problems
    assert any(fragment in p for p in problems), problems


@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical(assets, tmp_path):
    def recipe_file(folder: Path) -> Path:
        folder.mkdir()
        recipe = sft_recipe(assets, folder / "run", "chat", training={"epochs": 2, "lr": 1e-3},
                            output={"save_every_steps": 3}, task={"generations": 0})
        return write_recipe(folder / "recipe.yaml", recipe)

    reference = recipe_file(tmp_path / "reference")
    assert run_in_process(reference) == 0
    resumed = recipe_file(tmp_path / "resumed")
    assert run_faulty("kill", 5, "0", resumed).returncode == -9
    assert run_in_process(resumed, "output.resume_from=auto") == 0
    expected, got = train_records(tmp_path / "reference" / "run"), train_records(tmp_path / "resumed" / "run")
    assert [got[s]["loss"] for s in sorted(expected)] == [expected[s]["loss"] for s in sorted(expected)]
    assert_same_weights(final_weights(tmp_path / "reference" / "run"), final_weights(tmp_path / "resumed" / "run"))


# Two processes through `accelerate launch` with the shipped configs, each against one process at the same global
# batch (8 x 1): DDP at 2 x 2 per process also checks that the step's token count is summed over the processes.
@pytest.fixture(scope="module")
def one_process_sft(assets, tmp_path_factory) -> Path:
    return steps_of(assets, tmp_path_factory.mktemp("one_process_sft"), "run", 8, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "env", "per_device", "accumulation"),
    [("cpu_ddp.yaml", CPU_DDP, 2, 2), ("zero2.yaml", CPU_DEEPSPEED, 2, 2), ("zero3.yaml", CPU_DEEPSPEED, 4, 1)],
)
def test_two_processes_train_the_one_process_sft_model(assets, tmp_path, one_process_sft, config, env, per_device, accumulation):
    recipe = sft_recipe(assets, tmp_path / "run", "prompt_completion",
                        training={"per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                                  "lr": 1e-3, "epochs": 1},
                        evaluation={"before_training": False}, task={"generations": 0})
    result = launch(f"accelerate_configs/{config}", write_recipe(tmp_path / "r.yaml", recipe), env)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = lambda run: [r["loss"] for r in read_metrics_log(run) if r["kind"] == "train"]  # noqa: E731
    assert losses(tmp_path / "run") == pytest.approx(losses(one_process_sft), abs=1e-5)
    expected, got = final_weights(one_process_sft), final_weights(tmp_path / "run")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_zero3_lora_bf16_sft_trains_and_exports(assets, tmp_path):
    from peft import AutoPeftModelForCausalLM

    recipe = sft_recipe(assets, tmp_path / "run", "labelled",
                        training={"precision": "bf16", "per_device_batch_size": 4},
                        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge_on_save": True},
                        task={"generations": 1})
    result = launch("accelerate_configs/zero3.yaml", write_recipe(tmp_path / "r.yaml", recipe), CPU_DEEPSPEED)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in read_metrics_log(tmp_path / "run") if r["kind"] == "eval"]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert (tmp_path / "run" / "generations").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32)
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=2e-2)
