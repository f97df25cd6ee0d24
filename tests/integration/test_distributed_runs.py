"""Real 2-process runs on CPU through `accelerate launch launcher/run.py` with the shipped accelerate_configs/:
DDP over gloo, DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with offload each train the same model as one process with
the same global batch; ZeRO-3 + LoRA (fp32, bf16) trains and exports models that reproduce the in-training evaluation.

Every run starts from one saved tiny BERT without dropout *with* its classification head, so nothing is
initialised at random inside a run (under ZeRO-3 rank 0 would initialise a missing head from another RNG
stream than a single process does).

Tolerances: support/launching.py (float32 summation order only; 1e-5 is 100x the measured drift).
"""

from __future__ import annotations

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from launching import CPU_DDP, CPU_DEEPSPEED, TOLERANCE, assert_weights_close, launch, train_losses
from recipes import write_run
from runs import REPO, eval_loss_of
from launcher.train.reporting import read_metrics_log

pytestmark = pytest.mark.slow

@pytest.mark.parametrize(
    ("config", "env", "per_device", "accumulation"),
    [
        ("cpu_ddp.yaml", CPU_DDP, 4, 1),
        ("zero2.yaml", CPU_DEEPSPEED, 2, 2),  # DeepSpeed's own accumulation path, filled from the recipe
        ("zero3.yaml", CPU_DEEPSPEED, 4, 1),
        ("zero3_offload.yaml", CPU_DEEPSPEED, 4, 1),  # DeepSpeed's offload path (host = device memory here)
    ],
)
def test_two_processes_train_the_one_process_model(tmp_path, start_model, one_process, config, env, per_device, accumulation):
    result = launch(f"accelerate_configs/{config}", write_run(tmp_path, start_model, per_device, accumulation), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch : 8 = " in result.stdout and "x 2 process(es)" in result.stdout
    assert "parameters: 23,554 trainable of 23,554" in result.stdout  # ZeRO-3 shards counted at full size
    run_dir = tmp_path / "out"
    assert train_losses(run_dir) == pytest.approx(train_losses(one_process), rel=0, abs=TOLERANCE)
    assert len(train_losses(run_dir)) == 8
    assert_weights_close(run_dir / "model", one_process / "model")


def test_multi_gpu_launch_on_a_cpu_machine_is_refused(tmp_path, start_model):
    """Measured: without the refusal both processes train their own copy and exit 0 (DistributedType.NO)."""
    result = launch("accelerate_configs/ddp.yaml", write_run(tmp_path, start_model, 4, 1), env={})
    assert result.returncode != 0
    assert "each process would train its own copy" in result.stderr
    assert "accelerate_configs/cpu_ddp.yaml" in result.stderr
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("bf16", 1e-3)])
def test_zero3_lora_exports_models_that_reproduce_the_training_evaluation(tmp_path, start_model, precision, tolerance):
    """bf16 used to fail in DeepSpeed's partitioning (fp32 adapters beside bf16 base weights). The bf16
    tolerance covers bf16 weights (the merge W + BA rounded once more) evaluated in fp32 against the training
    run's autocast forward: measured 2.4e-5 on the eval loss, bounded at 40x that."""
    recipe = write_run(tmp_path, start_model, 4, 1, training={"precision": precision, "lr": 1e-2},
                       lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge_on_save": True})
    result = launch("accelerate_configs/zero3.yaml", recipe, CPU_DEEPSPEED)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out"
    trained_eval = [r for r in read_metrics_log(run_dir) if r["kind"] == "eval"][-1]["loss"]

    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "model", dtype=torch.float32)
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(run_dir / "adapter", dtype=torch.float32)
    assert eval_loss_of(merged, run_dir) == pytest.approx(trained_eval, abs=tolerance)
    assert eval_loss_of(adapter, run_dir) == pytest.approx(trained_eval, abs=tolerance)

    # Trained and merged: exactly the adapted projections and the head moved, under the checkpoint's key names.
    start = load_file(start_model["start"] / "model.safetensors")
    final = load_file(run_dir / "model" / "model.safetensors")
    assert sorted(final) == sorted(start)
    moved = {name for name, tensor in final.items() if not torch.equal(tensor, start[name].to(tensor.dtype))}
    assert moved == {name for name in start if name.endswith(("query.weight", "value.weight")) or name.startswith("classifier.")}


SHARD_PROBE = '''import os

from launcher.data.labels import LabelSpace
from launcher.distributed.accelerator import build_accelerator
from launcher.distributed.devices import detect_device
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.loading import load_recipe
from launcher.tasks.sequence_classification.single_label import SequenceClassification

recipe = load_recipe({recipe!r})
accelerator = build_accelerator(recipe, "bf16", detect_device())
task = SequenceClassification(recipe, load_tokenizer(recipe.model), LabelSpace(["negative", "positive"]))
model, _ = load_model(recipe, task, task.tokenizer)
frozen = [p for p in model.parameters() if not p.requires_grad]
line = (f"local {{sum(p.numel() for p in frozen)}} full {{sum(p.ds_numel for p in frozen)}} "
        f"dtypes {{sorted({{str(p.dtype) for p in model.parameters()}})}}\\n")
os.write(1, line.encode())  # one write per rank: print's separate writes interleave between the two ranks
# Leave together, as launcher/run.py does: a rank still tearing down gloo after its peer left can abort at exit.
accelerator.wait_for_everyone()
accelerator.end_training()
'''


def test_zero3_loads_each_process_shard_only(tmp_path, start_model):
    """Before `prepare`, right out of `load_model`: the frozen base holds no local elements (zero.Init
    partitioned it while loading) and the adapters already share its bf16 dtype."""
    recipe = write_run(tmp_path, start_model, 4, 1, training={"precision": "bf16"}, lora={"enabled": True})
    probe = tmp_path / "probe.py"
    probe.write_text(SHARD_PROBE.format(recipe=str(recipe)))
    result = launch("accelerate_configs/zero3.yaml", recipe, {**CPU_DEEPSPEED, "PYTHONPATH": str(REPO)}, script=str(probe))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("local ")]
    assert lines == ["local 0 full 23554 dtypes ['torch.bfloat16']"] * 2
