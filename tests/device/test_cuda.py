"""The launcher on a CUDA GPU, end to end through the real entry point on tiny saved models (`pytest -m cuda`):
bf16, fp16 with loss scaling, LoRA on a decoder, packed batches under sdpa, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2
in one process, kill -9 and resume; each export is reloaded and must predict what the run evaluated.

Skipped where no GPU is visible. `benchmarks/device/run.sh --smoke` (LAUNCHER_KIT_SMOKE=1, in CI) runs the tests
that can run on a CPU there, so this file cannot rot between lent GPUs; fp16, ZeRO and FSDP2 need the GPU.

Tolerances. An export reloaded in fp32 and evaluated under the run's autocast must reproduce the in-training eval
loss within 1e-2 relative (bf16 keeps 8 bits of mantissa; the same kernels on the same batches usually give it
exactly) and its accuracy to one example. Runs compared step by step (ZeRO / FSDP2 / packed against the plain
loop) run in fp32, where TF32 is off by default in PyTorch: they differ by summation order only, 1e-4 on losses.
Resume: GPU kernels are not bit-deterministic by default (atomics in some backward kernels, cuBLAS workspace
choices); the resume test runs eager attention with CUBLAS_WORKSPACE_CONFIG=:4096:8, expects bit-identical
losses and weights and fails beyond 1e-6 (the `bit_identical` property in the report says which held).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Before any CUDA context exists: cuBLAS then picks deterministic workspaces (the resume test needs them).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import AutoPeftModelForSequenceClassification  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from launching import free_port
from recipes import tiny_recipe, write_recipe
from runs import REPO, run_in_process
from faults import faulty_command, final_weights, train_records  # noqa: E402
# start_model: the dropout-free tiny BERT saved with its head (ZeRO-3 cannot initialise a missing head).
from launcher.recipe.loading import load_recipe  # noqa: E402
from launcher.tasks import prepare_task  # noqa: E402
from launcher.train.reporting import read_metrics_log  # noqa: E402
from launcher.train.run_directory import read_run_summary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMOKE = os.environ.get("LAUNCHER_KIT_SMOKE") == "1"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cpu" and not SMOKE, reason="needs a CUDA GPU (CI runs the CPU-capable ones through "
                                                             "benchmarks/device/run.sh --smoke)"),
]
gpu_only = pytest.mark.skipif(DEVICE == "cpu", reason="needs a CUDA GPU")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
STEP_TOLERANCE = 1e-4


def train(tmp_path: Path, assets, name: str, *overrides: str, model: str = "bert", **sections) -> Path:
    """One epoch (8 steps) of the tiny model in this process; `overrides` as on the command line."""
    out = tmp_path / name
    training = {"epochs": 1, **sections.pop("training", {})}
    path = write_recipe(tmp_path / f"{name}.yaml", tiny_recipe(assets, out, model=model, training=training, **sections))
    assert run_in_process(path, *overrides) == 0
    return out


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics_log(run_dir) if r["kind"] == "train"]


@torch.no_grad()
def predict(model: torch.nn.Module, run_dir: Path) -> tuple[float, float]:
    """(loss, accuracy) of `model` on the run's eval set, batched, collated and autocast as the run evaluated it."""
    recipe = load_recipe(run_dir / "recipe.resolved.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / ("adapter" if (run_dir / "adapter").exists() else "model"))
    prepared = prepare_task(recipe, tokenizer)
    task, examples = prepared.task, prepared.data.eval
    loader = DataLoader(examples, batch_size=recipe.eval_batch_size, collate_fn=task.collators()[1])
    model.to(DEVICE).eval()
    precision = recipe.training.precision
    losses, correct = [], 0
    for batch in loader:
        batch = {key: value.to(DEVICE) for key, value in batch.items()}
        with torch.autocast(DEVICE, dtype=AUTOCAST.get(precision, torch.float32), enabled=precision != "fp32"):
            logits = model(**batch).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return float(sum(losses)) / len(examples), correct / len(examples)


def assert_export_predicts_the_evaluation(model: torch.nn.Module, run_dir: Path) -> None:
    final = read_run_summary(run_dir)["final_eval"]
    loss, accuracy = predict(model, run_dir)
    assert loss == pytest.approx(final["loss"], rel=1e-2)
    assert abs(accuracy - final["accuracy"]) <= 1 / final["examples"] + 1e-9


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=gpu_only)])
def test_mixed_precision_trains_on_the_gpu_and_the_export_predicts_the_evaluation(tmp_path, assets, monkeypatch, precision):
    scaled = []
    scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, outputs: scaled.append(1) or scale(self, outputs))
    out = train(tmp_path, assets, precision, training={"precision": precision, "lr": 5e-3})
    losses = train_losses(out)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    evals = [r for r in read_metrics_log(out) if r["kind"] == "eval"]
    if DEVICE == "cuda":
        assert evals[-1]["peak_device_memory_bytes"] > 0, "the run must have trained on the GPU"
    assert len(scaled) == (8 if precision == "fp16" else 0), "fp16 scales every loss (dynamic loss scaling); bf16 none"
    assert_export_predicts_the_evaluation(AutoModelForSequenceClassification.from_pretrained(out / "model"), out)


def test_lora_on_a_decoder_in_bf16_exports_an_adapter_that_predicts_the_evaluation(tmp_path, assets):
    out = train(tmp_path, assets, "lora", model="llama", training={"precision": "bf16"}, lora={"enabled": True, "r": 4})
    pad_token_id = AutoTokenizer.from_pretrained(out / "adapter").pad_token_id
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(out / "adapter", pad_token_id=pad_token_id)
    assert_export_predicts_the_evaluation(adapter, out)


def test_packed_batches_under_sdpa_train_like_padded_batches(tmp_path, assets):
    sections = {"model": "llama", "training": {"lr": 1e-3}}
    padded = train(tmp_path, assets, "padded", "model.attn_implementation=sdpa", data={"padding": "dynamic"}, **sections)
    packed = train(tmp_path, assets, "packed", "model.attn_implementation=sdpa", data={"padding": "packed"}, **sections)
    records = [r for r in read_metrics_log(packed) if r["kind"] == "train"]
    assert all(r["real_tokens"] == r["padded_tokens"] for r in records), "packed batches hold no padding"
    assert train_losses(packed) == pytest.approx(train_losses(padded), abs=STEP_TOLERANCE)


@pytest.fixture(scope="module")
def plain_run(start_model, tmp_path_factory) -> Path:
    """The plain one-process loop on the same model, in fp32: what each sharded engine must reproduce."""
    return train(tmp_path_factory.mktemp("plain"), start_model, "plain", model="start")


@gpu_only
@pytest.mark.parametrize("config", ["zero2", "zero3", "fsdp2"])
def test_sharded_engines_in_one_process_train_like_the_plain_loop(tmp_path, start_model, plain_run, config):
    path = write_recipe(tmp_path / f"{config}.yaml", tiny_recipe(start_model, tmp_path / config, model="start",
                                                                   training={"epochs": 1}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}.yaml",
               "--num_processes", "1", "--main_process_port", str(free_port()), "launcher/run.py", str(path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert train_losses(tmp_path / config) == pytest.approx(train_losses(plain_run), abs=STEP_TOLERANCE)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / config / "model", dtype=torch.float32)
    assert_export_predicts_the_evaluation(exported, tmp_path / config)


def test_kill_9_and_resume_continues_the_same_run(tmp_path, assets, record_property):
    eager = "model.attn_implementation=eager"  # sdpa's memory-efficient backward is not deterministic on GPUs
    sections = {"training": {"epochs": 2, "seed": 7}, "output": {"save_every_steps": 3}}
    reference = train(tmp_path, assets, "reference", eager, **sections)
    recipe = write_recipe(tmp_path / "killed.yaml", tiny_recipe(assets, tmp_path / "killed", **sections))
    killed = subprocess.run(faulty_command("kill", 5, "0", recipe, eager), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert run_in_process(recipe, eager, "output.resume_from=auto") == 0

    expected, resumed = train_records(reference), train_records(tmp_path / "killed")
    assert sorted(resumed) == sorted(expected) == list(range(1, 17))
    losses = [(resumed[s]["loss"], expected[s]["loss"]) for s in expected]
    weights = final_weights(tmp_path / "killed"), final_weights(reference)
    differences = [float((weights[0][name] - tensor).abs().max()) for name, tensor in weights[1].items()]
    record_property("bit_identical", all(a == b for a, b in losses) and max(differences) == 0.0)
    assert [a for a, _ in losses] == pytest.approx([b for _, b in losses], rel=1e-6)
    assert max(differences) <= 1e-6
