"""`data.padding: packed`: each training batch as one row without padding. The proof that it keeps accuracy is
that it is the same computation as right padding: the same logits, loss and gradients, hence the same run."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, DataCollatorWithPadding

from recipes import tiny_recipe, write_recipe
from runs import eval_loss_of, run_in_process
from launcher.data.batches import example_token_ids
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.schema import Recipe
from launcher.tasks import prepare_task
from launcher.tasks.sequence_classification.batches import PackedCollator
from launcher.tasks.sequence_classification.packing import PACKED_ARCHITECTURES, enable_packed_batches
from launcher.train.reporting import read_metrics_log
from launcher.train.run_directory import read_run_summary


def test_collator_joins_examples_and_restarts_positions():
    pad = 2
    batch = PackedCollator(pad)([
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1},
        {"input_ids": [8], "attention_mask": [1], "labels": 0},
        {"input_ids": [9, 10, pad], "attention_mask": [1, 1, 1], "labels": 1},  # ends in the pad token (pad = EOS)
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, pad]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 2]]
    # The model's own rule in a padded batch: the last token that is not the pad token.
    assert batch["classify_at"].tolist() == [2, 3, 5]
    assert batch["labels"].tolist() == [1, 0, 1] and "attention_mask" not in batch
    assert [ids.tolist() for ids in example_token_ids(batch)] == [[5, 6, 7], [8], [9, 10, pad]]


def llama_setup(assets, tmp_path, lora: bool):
    recipe = Recipe.model_validate(tiny_recipe(
        assets, tmp_path, model="llama", data={"padding": "packed"}, lora={"enabled": lora, "r": 4, "dropout": 0.0}
    ))
    tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_task(recipe, tokenizer)
    task, train = prepared.task, prepared.data.train
    features = [train[i] for i in range(8)]
    features[0]["input_ids"] = features[0]["input_ids"] + [tokenizer.pad_token_id]  # as a tokenizer appending EOS = pad
    features[0]["attention_mask"] = features[0]["attention_mask"] + [1]
    torch.manual_seed(0)
    return load_model(recipe, task, tokenizer)[0], features, tokenizer


def forward_backward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.loss.detach(), output.logits.detach(), grads


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_forward_and_gradients_equal_right_padding(assets, tmp_path, lora):
    model, features, tokenizer = llama_setup(assets, tmp_path, lora)
    assert tokenizer.padding_side == "right"
    padded = DataCollatorWithPadding(tokenizer)(features)
    packed = PackedCollator(tokenizer.pad_token_id)(features)
    assert packed["input_ids"].numel() == padded["attention_mask"].sum() < padded["input_ids"].numel()

    loss, logits, grads = forward_backward(model, padded)
    packed_loss, packed_logits, packed_grads = forward_backward(model, packed)
    torch.testing.assert_close(packed_logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=0)
    assert packed_grads.keys() == grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_type", PACKED_ARCHITECTURES)
def test_every_supported_architecture_keeps_packed_examples_apart(model_type):
    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    enable_packed_batches(model)
    lengths, generator = (5, 17, 1, 9), torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(3, 64, (n,), generator=generator).tolist(), "labels": i % 3}
                for i, n in enumerate(lengths)]
    padded_ids = torch.full((len(lengths), max(lengths)), 2)
    for row, feature in enumerate(features):
        padded_ids[row, :len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
    padded = model(input_ids=padded_ids, attention_mask=(padded_ids != 2).long(), labels=torch.tensor([0, 1, 2, 0]))
    packed = model(**PackedCollator(2)(features))
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=0)


def train(folder: Path, assets, name: str, *overrides: str, **sections) -> Path:
    out = folder / name
    recipe = tiny_recipe(assets, out, model="llama", **sections)
    recipe["training"].update({"log_sample_fingerprints": True, "seed": 3})
    assert run_in_process(write_recipe(folder / f"{name}.yaml", recipe), *overrides) == 0
    return out


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics_log(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, Path]:
    """The same tiny-Llama run (64 examples, batch 8, 2 epochs = 16 steps) with dynamic padding and packed."""
    folder = tmp_path_factory.mktemp("packing")
    return {padding: train(folder, assets, padding, data={"padding": padding}) for padding in ("dynamic", "packed")}


def test_packed_run_is_the_padded_run_without_the_padding(runs):
    dynamic, packed = train_records(runs["dynamic"]), train_records(runs["packed"])
    assert len(packed) == len(dynamic) == 16
    # Same examples in the same order (crc32 of each example's tokens, read from either layout).
    assert [r["sample_fingerprints"] for r in packed] == [r["sample_fingerprints"] for r in dynamic]
    assert all(r["samples"] == 8 and r["real_tokens"] == r["padded_tokens"] > 0 for r in packed)
    assert [r["real_tokens"] for r in packed] == [r["real_tokens"] for r in dynamic]
    assert sum(r["padded_tokens"] for r in dynamic) > 1.2 * sum(r["padded_tokens"] for r in packed)
    # Same math, different summation order: every step's loss agrees to float32 rounding, across 16 updates.
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in dynamic], abs=1e-5)
    final = {p: read_run_summary(runs[p])["final_eval"] for p in runs}
    assert final["packed"]["loss"] == pytest.approx(final["dynamic"]["loss"], abs=1e-5)
    assert final["packed"]["accuracy"] == final["dynamic"]["accuracy"]


def test_packed_export_is_a_plain_model_that_reproduces_the_evaluation(runs):
    exported = {p: AutoModelForSequenceClassification.from_pretrained(runs[p] / "model") for p in runs}
    assert exported["packed"].state_dict().keys() == exported["dynamic"].state_dict().keys()
    assert (runs["packed"] / "model" / "config.json").read_text() == (runs["dynamic"] / "model" / "config.json").read_text()
    reported = read_run_summary(runs["packed"])["final_eval"]["loss"]
    assert eval_loss_of(exported["packed"], runs["packed"]) == pytest.approx(reported, abs=1e-5)


def test_resume_continues_packed_and_crosses_padding_modes(runs, assets, tmp_path):
    same = train(tmp_path, assets, "same", f"output.resume_from={runs['packed'] / 'checkpoints' / 'step-00000008'}",
                 data={"padding": "packed"})
    assert [r["loss"] for r in train_records(same)] == [r["loss"] for r in train_records(runs["packed"])][8:]
    # Checkpoints hold the plain model's keys, so a dynamic run's checkpoint resumes packed (and back).
    crossed = train(tmp_path, assets, "crossed", f"output.resume_from={runs['dynamic'] / 'checkpoints' / 'step-00000008'}",
                    data={"padding": "packed"})
    expected = [r["loss"] for r in train_records(runs["dynamic"])][8:]
    assert [r["loss"] for r in train_records(crossed)] == pytest.approx(expected, abs=1e-5)


def test_packed_lora_run_exports_adapter_and_merged_model(assets, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    out = train(tmp_path, assets, "lora", data={"padding": "packed"}, training={"epochs": 1},
                lora={"enabled": True, "r": 4, "merge_on_save": True})
    reported = read_run_summary(out)["final_eval"]["loss"]
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(out / "adapter", pad_token_id=2)
    assert eval_loss_of(adapter, out) == pytest.approx(reported, abs=1e-5)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert eval_loss_of(merged, out) == pytest.approx(reported, abs=1e-4)


def test_encoder_is_refused_with_the_fix(assets, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "bert.yaml", tiny_recipe(assets, tmp_path / "out", data={"padding": "packed"}))
    for args in ((), ("--check",)):
        assert run_in_process(recipe, *args) == 1
        err = capsys.readouterr().err
        assert "data.padding=packed: model type 'bert' is not a decoder known to keep packed examples apart" in err, err
        assert "Use data.padding=dynamic" in err
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.slow
def test_two_processes_pack_through_ddp(assets, tmp_path):
    """Two ranks over gloo: the packed forward runs through DDP's wrapper and its gradient all-reduce."""
    from faults import run_faulty

    records = {}
    for padding in ("dynamic", "packed"):
        recipe = tiny_recipe(assets, tmp_path / padding, model="llama", data={"padding": padding},
                             training={"epochs": 1, "log_sample_fingerprints": True})
        done = run_faulty("none", 0, "all", write_recipe(tmp_path / f"{padding}.yaml", recipe), processes=2)
        assert done.returncode == 0, done.stderr[-3000:]
        records[padding] = train_records(tmp_path / padding)
    assert [r["sample_fingerprints"] for r in records["packed"]] == [r["sample_fingerprints"] for r in records["dynamic"]]
    assert all(r["samples"] == 16 and r["real_tokens"] == r["padded_tokens"] for r in records["packed"])
    assert [r["loss"] for r in records["packed"]] == pytest.approx([r["loss"] for r in records["dynamic"]], abs=1e-5)
