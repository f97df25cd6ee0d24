"""DeepSpeed settings come from the recipe: `auto` values are filled from it, contradicting values are an error
raised before any weights load (checked here on the function and once through a real DeepSpeed launch)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType

from launching import CPU_DEEPSPEED, launch
from recipes import tiny_recipe, write_recipe
from runs import REPO
from launcher.distributed.accelerator import DeepSpeedConfigError, optimizer_offloaded, optimizer_step_device, reconcile_deepspeed_config
from launcher.recipe.schema import TrainingSection
from launcher.train.optimization import build_optimizer

TRAINING = TrainingSection(per_device_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=0.5)


def shipped(name: str) -> dict:
    return json.loads((REPO / "accelerate_configs" / "deepspeed" / name).read_text())


def test_auto_values_are_filled_from_the_recipe():
    config = shipped("zero3.json")
    reconcile_deepspeed_config(config, TRAINING, "bf16", world_size=8)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 4 * 3 * 8
    assert config["gradient_clipping"] == 0.5  # Accelerate alone would write 1.0
    assert (config["bf16"]["enabled"], config["fp16"]["enabled"]) == (True, False)


def test_absent_values_are_filled_and_no_clipping_is_zero():
    config = {"zero_optimization": {"stage": 2}}
    reconcile_deepspeed_config(config, TrainingSection(max_grad_norm=None), "fp32", world_size=2)
    assert config["gradient_clipping"] == 0.0
    assert (config["bf16"], config["fp16"]) == ({"enabled": False}, {"enabled": False})
    assert config["train_batch_size"] == 8 * 1 * 2


def test_values_matching_the_recipe_are_accepted():
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "gradient_clipping": 0.5,
              "bf16": {"enabled": True}}
    reconcile_deepspeed_config(config, TRAINING, "bf16", world_size=1)
    # The matching values stay as they were and only what was absent is filled in.
    assert config == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "gradient_clipping": 0.5,
                      "bf16": {"enabled": True}, "fp16": {"enabled": False}, "train_batch_size": 12}


def test_every_contradiction_is_reported_at_once():
    config = {**shipped("zero2.json"), "gradient_accumulation_steps": 8, "train_micro_batch_size_per_gpu": 16,
              "bf16": {"enabled": True}, "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(DeepSpeedConfigError) as raised:
        reconcile_deepspeed_config(config, TRAINING, "fp32", world_size=2)
    message = str(raised.value)
    for expected in ("gradient_accumulation_steps is 8 but the recipe gives 3",
                     "train_micro_batch_size_per_gpu is 16 but the recipe gives 4",
                     "bf16.enabled is True but the recipe gives False",
                     "`optimizer` is set", "`scheduler` is set"):
        assert expected in message


def test_zero3_must_gather_the_model_for_export():
    config = shipped("zero3.json")
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with pytest.raises(DeepSpeedConfigError, match="stage3_gather_16bit_weights_on_model_save must be true"):
        reconcile_deepspeed_config(config, TRAINING, "bf16", world_size=1)


def test_offloaded_optimizer_states_are_stepped_by_the_recipes_torch_optimizer():
    config = shipped("zero3_offload.json")
    assert optimizer_offloaded(config) and not optimizer_offloaded(shipped("zero3.json"))
    reconcile_deepspeed_config(config, TRAINING, "bf16", world_size=8)
    assert config["zero_force_ds_cpu_optimizer"] is False  # else DeepSpeed refuses any optimizer but its own
    config["zero_force_ds_cpu_optimizer"] = True
    with pytest.raises(DeepSpeedConfigError, match="zero_force_ds_cpu_optimizer is true"):
        reconcile_deepspeed_config(config, TRAINING, "bf16", world_size=8)


@pytest.mark.parametrize(("step_device", "fused"), [("cpu", True), ("cuda", True), ("npu", False)])
def test_adamw_is_fused_where_the_step_runs_has_a_fused_kernel(step_device, fused):
    optimizer = build_optimizer(torch.nn.Linear(4, 2), TrainingSection(weight_decay=0.1), step_device)
    assert all(group["fused"] == fused for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]  # the bias is not decayed


def accelerator_with(distributed_type: DistributedType, deepspeed_config: dict | None = None) -> SimpleNamespace:
    """The two attributes `optimizer_step_device` reads from an Accelerator."""
    plugin = SimpleNamespace(deepspeed_config=deepspeed_config)
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_offloaded_optimizer_steps_on_the_host_whatever_the_accelerator():
    offload = accelerator_with(DistributedType.DEEPSPEED, shipped("zero3_offload.json"))
    assert optimizer_step_device(offload, "npu") == "cpu"  # fused CPU kernel instead of NPU's unfused fallback
    assert optimizer_step_device(accelerator_with(DistributedType.DEEPSPEED, shipped("zero3.json")), "npu") == "npu"
    assert optimizer_step_device(accelerator_with(DistributedType.MULTI_GPU), "cuda") == "cuda"


@pytest.mark.slow
def test_a_contradicting_file_stops_a_real_launch_before_training(tmp_path, assets):
    bad = {**shipped("zero2.json"), "gradient_accumulation_steps": 4}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    accelerate_config = yaml.safe_load((REPO / "accelerate_configs" / "zero2.yaml").read_text())
    accelerate_config["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(accelerate_config))
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(assets, tmp_path / "out"))
    result = launch(str(tmp_path / "bad.yaml"), recipe, CPU_DEEPSPEED, processes=1)
    assert result.returncode != 0
    assert "gradient_accumulation_steps is 4 but the recipe gives 1" in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_deepspeed_launch_that_accelerate_turns_into_plain_processes_is_refused(tmp_path, assets):
    """Measured with Accelerate 1.16: ACCELERATE_USE_CPU=true with a DeepSpeed config forms a MULTI_CPU group that
    trains without ZeRO and exits 0."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(assets, tmp_path / "out"))
    result = launch("accelerate_configs/zero2.yaml", recipe, {"ACCELERATE_USE_CPU": "true"}, processes=2)
    assert result.returncode != 0
    assert "a DeepSpeed config was launched but Accelerate formed DistributedType.MULTI_CPU" in result.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
