"""End to end through the real entry point on tiny saved models: single text, pairs, LoRA (BERT and a
Llama without a pad token), bf16 on CPU, accumulation equivalence, epoch resume, determinism, and a final
folder that reloads offline and reproduces the in-training evaluation."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from recipes import tiny_recipe, write_recipe
from runs import REPO, eval_loss_of, run_cli, run_in_process
from launcher.distributed.devices import detect_device, native_bf16
from launcher.train.reporting import read_metrics_log
from launcher.train.run_directory import read_run_summary


def train(tmp_path: Path, assets, name: str = "run", *overrides: str, model: str = "bert", **sections) -> Path:
    out = tmp_path / name
    path = write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(assets, out, model=model, **sections))
    assert run_in_process(path, *overrides) == 0
    return out


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics_log(run_dir) if r["kind"] == "train"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_single_text_run_writes_everything_and_the_model_reloads(tmp_path, assets):
    out = train(tmp_path, assets)
    summary = read_run_summary(out)
    assert summary["optimizer_steps"] == 16 and summary["epochs_completed"] == 2
    log = read_metrics_log(out)
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 17))
    assert [r["step"] for r in log if r["kind"] == "eval"] == [8, 16]
    assert all(r["samples"] == 8 and r["padded_tokens"] >= r["real_tokens"] > 0 for r in log if r["kind"] == "train")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000008", "step-00000016"]
    assert (out / "recipe.resolved.yaml").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert reloaded.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert eval_loss_of(reloaded, out) == pytest.approx(summary["final_eval"]["loss"], abs=1e-5)


def test_evaluation_every_steps_without_repeating_epoch_ends(tmp_path, assets):
    out = train(tmp_path, assets, "every", evaluation={"every_steps": 4, "metrics": ["accuracy"]})
    assert [r["step"] for r in read_metrics_log(out) if r["kind"] == "eval"] == [4, 8, 12, 16]


def test_tensorboard_tracker_writes_events(tmp_path, assets):
    out = train(tmp_path, assets, "tb", output={"report_to": "tensorboard"}, training={"epochs": 1})
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_model_learns_the_synthetic_task(tmp_path, assets):
    out = train(tmp_path, assets, "learn", training={"epochs": 8, "lr": 5e-3})
    evals = [r for r in read_metrics_log(out) if r["kind"] == "eval"]
    assert evals[-1]["accuracy"] >= 0.8 and evals[-1]["loss"] < evals[0]["loss"]


def test_sentence_pairs(tmp_path, assets):
    data = {"train_file": str(assets["pair_train_csv"]), "eval_file": str(assets["pair_eval_csv"]),
            "text_field": "sentence1", "text_pair_field": "sentence2"}
    out = train(tmp_path, assets, "pairs", data=data)
    summary = read_run_summary(out)
    assert set(summary["final_eval"]) == {"loss", "accuracy", "f1", "examples", "per_class", "confusion", "predicted"}
    final = summary["final_eval"]
    assert final["examples"] == 32 == sum(map(sum, final["confusion"])) == sum(final["predicted"].values())
    assert set(final["per_class"]) == {"LABEL_0", "LABEL_1"}
    assert (out / "confusion.png").is_file() and (out / "curves.png").is_file()


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_lora_saves_adapter_and_merged_model_that_reproduce_the_evaluation(tmp_path, assets, model):
    out = train(tmp_path, assets, f"lora_{model}", model=model, lora={"enabled": True, "r": 4, "merge_on_save": True})
    expected = read_run_summary(out)["final_eval"]["loss"]
    # The adapter loads its base from the original checkpoint, whose config may lack a pad token (Llama):
    # pass the one the run padded with, as the README says.
    pad_token_id = AutoTokenizer.from_pretrained(out / "adapter").pad_token_id
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(out / "adapter", pad_token_id=pad_token_id)
    trainable_head = [n for n in weights_names(out / "adapter") if "classifier" in n or "score" in n]
    assert trainable_head, "the classification head must be saved with the adapter (modules_to_save)"
    assert eval_loss_of(adapter, out) == pytest.approx(expected, abs=1e-5)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert not any("lora" in n for n in weights(out / "model"))
    assert eval_loss_of(merged, out) == pytest.approx(expected, abs=1e-4)


def weights_names(folder: Path) -> list[str]:
    return list(load_file(str(folder / "adapter_model.safetensors")))


def test_llama_without_pad_token_trains_batches_with_padding(tmp_path, assets):
    out = train(tmp_path, assets, "llama", model="llama")
    assert AutoTokenizer.from_pretrained(assets["llama"]).pad_token is None
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.pad_token_id == AutoTokenizer.from_pretrained(out / "model").pad_token_id == 2
    log = read_metrics_log(out)
    assert any(r["padded_tokens"] > r["real_tokens"] for r in log if r["kind"] == "train")


def test_bf16_autocast_on_cpu(tmp_path, assets, capsys):
    out = train(tmp_path, assets, "bf16", training={"precision": "bf16", "epochs": 1})
    # Runs on every CPU; the plan says when the CPU has no bf16 arithmetic of its own.
    converted = not native_bf16(detect_device())
    assert ("bf16 on this CPU (no AVX-512 BF16 or AMX) runs through fp32 conversions" in capsys.readouterr().out) is converted
    log = [r for r in read_metrics_log(out) if r["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # Mixed precision pads to a multiple of 8 for tensor-core shapes.
    assert all(r["padded_tokens"] % (8 * r["samples"]) == 0 for r in log)


def test_gradient_accumulation_is_equivalent_to_a_bigger_batch(tmp_path, assets):
    base = {"model": "bert_no_dropout"}
    big = train(tmp_path, assets, "b8", training={"per_device_batch_size": 8, "gradient_accumulation_steps": 1}, **base)
    acc = train(tmp_path, assets, "b4x2", training={"per_device_batch_size": 4, "gradient_accumulation_steps": 2}, **base)
    assert train_losses(acc) == pytest.approx(train_losses(big), abs=1e-5)
    for name, tensor in weights(big / "model").items():
        torch.testing.assert_close(weights(acc / "model")[name], tensor, atol=1e-5, rtol=0)


def test_same_recipe_twice_gives_the_same_losses(tmp_path, assets):
    first = train(tmp_path, assets, "once", training={"epochs": 1})
    second = train(tmp_path, assets, "twice", training={"epochs": 1})
    assert train_losses(first) == train_losses(second)


def test_resume_from_an_epoch_checkpoint_is_the_same_run(tmp_path, assets):
    full = train(tmp_path, assets, "full")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    path = write_recipe(tmp_path / "resumed.yaml", tiny_recipe(assets, resumed))
    epoch_one = full / "checkpoints" / "step-00000008"
    assert run_in_process(path, f"output.resume_from={epoch_one}") == 0
    assert train_losses(resumed) == train_losses(full)[8:]
    for name, tensor in weights(full / "model").items():
        assert torch.equal(weights(resumed / "model")[name], tensor), name


def test_cli_check_and_errors_as_a_user_sees_them(tmp_path, assets):
    good = write_recipe(tmp_path / "good.yaml", tiny_recipe(assets, tmp_path / "out"))
    result = run_cli(str(good), "--check", "training.gradient_accumulation_steps=2", "--processes", "4")
    assert result.returncode == 0, result.stderr
    assert "global batch : 64 = 8 per device x 2 accumulation x 4 process(es)" in result.stdout
    assert "train 64 / eval 32" in result.stdout and "check: ok" in result.stdout
    bad = run_cli(str(good), "--check", "training.epochz=2")
    assert bad.returncode == 1 and "training.epochz: unknown key; did you mean 'epochs'?" in bad.stderr
    missing = write_recipe(tmp_path / "missing.yaml", tiny_recipe(assets, tmp_path / "o", data={"train_file": "nope.csv"}))
    result = run_cli(str(missing), "--check")
    assert result.returncode == 1 and "nope.csv: file not found" in result.stderr
    # A local model folder that does not exist used to pass the check (the hub id it might have been was skipped).
    for folder, reason in (("/no/such/folder", "is not a folder"), (str(tmp_path), "holds no config.json")):
        result = run_cli(str(good), "--check", f"model.name_or_path={folder}")
        assert result.returncode == 1 and f"model.name_or_path: {folder} {reason}" in result.stderr, result.stderr


def test_accelerate_launch_runs_the_entry_point(tmp_path, assets):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(assets, tmp_path / "acc", training={"epochs": 1}))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    result = subprocess.run(
        [accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "launcher/run.py", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch : 8 = 8 per device x 1 accumulation x 1 process(es)" in result.stdout
    assert read_run_summary(tmp_path / "acc")["optimizer_steps"] == 8
