"""The preflight memory plan: exact parameter counts from a config, the per-component arithmetic per topology,
and the verdict `--check` prints for Llama-3-8B on 8 x 80 GiB (ZeRO-3) and 1 x 80 GiB (DDP)."""

from __future__ import annotations

import pytest
from peft import TaskType
from transformers import AutoModelForSequenceClassification

from runs import REPO
from launcher.model.loading import apply_lora, count_parameters
from launcher.plan.memory import (
    ModelSize,
    Topology,
    activation_bytes,
    estimate_memory,
    load_topology,
    measure_model,
)
from launcher.recipe.loading import load_recipe
from launcher.run import main

LLAMA = str(REPO / "recipes" / "llama3_yelp.yaml")
CONFIGS = REPO / "accelerate_configs"
# A shape small enough to do the arithmetic by hand: 1000 parameters, all trainable, 100 in the largest layer.
SMALL = ModelSize(total=1000, trainable=1000, largest_gathered=100, hidden_size=8, layers=2, heads=2, source="test", vocab_size=50)


@pytest.fixture(autouse=True)
def run_from_repository_root(monkeypatch):
    """accelerate configs name their DeepSpeed files relative to the repository root, as the docs' commands do."""
    monkeypatch.chdir(REPO)


def llama(*overrides: str):
    return load_recipe(LLAMA, list(overrides))


def components(estimate) -> dict[str, float]:
    return {name: value for name, value in estimate.device_bytes.items() if name not in ("activations", "runtime overhead")}


def test_llama3_8b_classifier_parameters_are_counted_exactly_without_weights():
    size = measure_model(llama())
    # Llama-3-8B's 8,030,261,248 minus the 128256 x 4096 LM head plus a 4096 x 5 score head.
    assert size.total == size.trainable == 8_030_261_248 - 128256 * 4096 + 4096 * 5
    assert size.largest_gathered == 128256 * 4096  # the embedding outweighs a decoder layer (218M)
    assert (size.hidden_size, size.layers, size.heads) == (4096, 32, 32)


def test_lora_trainable_count_matches_the_real_model(assets):
    recipe = load_recipe(LLAMA, [f"model.name_or_path={assets['bert']}", "lora.enabled=true", "task.num_labels=2"])
    real = apply_lora(AutoModelForSequenceClassification.from_pretrained(assets["bert"], num_labels=2), recipe.lora, TaskType.SEQ_CLS)
    size = measure_model(recipe)
    assert (size.trainable, size.total) == count_parameters(real)
    assert size.trainable < size.total / 5


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        # mixed precision: 2 + 2 bytes of weights/gradients, 12 of fp32 master + m + v, 4 of step temporaries
        (1, {"weights": 2000, "gradients": 2000, "optimizer states (fp32 master, m, v)": 3000, "optimizer step temporaries": 1000}),
        (2, {"weights": 2000, "gradients": 500, "optimizer states (fp32 master, m, v)": 3000, "optimizer step temporaries": 1000}),
        (3, {"weights": 500, "gradients": 500, "optimizer states (fp32 master, m, v)": 3000, "optimizer step temporaries": 1000,
             "gathered layers (current + prefetched)": 400}),
    ],
)
def test_zero_stages_shard_states_gradients_then_weights(stage, expected):
    estimate = estimate_memory(SMALL, Topology("deepspeed", 4, zero_stage=stage), llama())
    assert components(estimate) == expected


def test_zero3_offload_moves_optimizer_and_weights_to_host():
    estimate = estimate_memory(SMALL, Topology("deepspeed", 4, 3, offload_optimizer=True, offload_params=True), llama())
    assert components(estimate) == {"gradients": 500, "gathered layers (current + prefetched)": 400}
    assert estimate.host_bytes == {"weights": 500, "optimizer states (fp32 master, m, v)": 3000, "optimizer step temporaries": 1000}


def test_deepspeed_fp32_keeps_no_master_copy():
    estimate = estimate_memory(SMALL, Topology("deepspeed", 4, zero_stage=3), llama("training.precision=fp32"))
    assert components(estimate)["optimizer states (m, v)"] == 8 * 1000 / 4
    assert components(estimate)["weights"] == 4 * 1000 / 4


def test_ddp_replicates_everything_and_adds_gradient_buckets_fsdp_shards():
    ddp = components(estimate_memory(SMALL, Topology("ddp", 4), llama()))  # bf16 weights: 2 bytes each
    assert ddp == {"weights": 2000, "gradients": 2000, "optimizer states (AdamW m, v)": 4000,
                   "optimizer step temporaries": 2000, "DDP gradient buckets": 2000}
    fsdp = components(estimate_memory(SMALL, Topology("fsdp", 4), llama()))
    assert fsdp == {"weights": 500, "gradients": 500, "optimizer states (AdamW m, v)": 1000,
                    "optimizer step temporaries": 500, "gathered layers (current + prefetched)": 400}


def test_activations_follow_the_per_layer_formula():
    b, s, h, layers = 4, 512, 8, 2  # llama3_yelp: batch 4, max_length 512, bf16, gradient checkpointing
    layer = 34 * s * b * h
    assert activation_bytes(SMALL, llama()) == layers * 2 * s * b * h + layer
    assert activation_bytes(SMALL, llama("model.gradient_checkpointing=false")) == layers * layer
    eager = llama("model.gradient_checkpointing=false", "model.attn_implementation=eager")
    assert activation_bytes(SMALL, eager) == layers * (layer + 5 * 2 * s * s * b)
    assert activation_bytes(SMALL, llama("model.gradient_checkpointing=false", "training.precision=fp32")) == 2 * layers * layer


def test_topology_comes_from_the_shipped_config_files():
    assert load_topology(str(CONFIGS / "zero3.yaml"), None, 80) == Topology("deepspeed", 8, 3, device_memory_gib=80)
    assert load_topology(str(CONFIGS / "zero3_offload.yaml"), 16, None) == Topology("deepspeed", 16, 3, True, True)
    assert load_topology(str(CONFIGS / "zero2.yaml"), None, None).zero_stage == 2
    assert load_topology(str(CONFIGS / "fsdp2.yaml"), None, None).strategy == "fsdp"
    assert load_topology(str(CONFIGS / "ddp.yaml"), 1, None) == Topology("ddp", 1)
    assert load_topology(None, None, None) == Topology("single", 1)


def test_check_shows_llama3_8b_fits_8_gpus_with_zero3_not_1_gpu_with_ddp(capsys):
    assert main([LLAMA, "--check", "--accelerate-config", "accelerate_configs/zero3.yaml", "--device-memory-gib", "80"]) == 0
    zero3 = capsys.readouterr().out
    assert "8 process(es), DeepSpeed ZeRO-3, 80 GiB per device" in zero3
    assert "optimizer states (fp32 master, m, v): 10.48 GiB" in zero3
    assert "estimated per device: 21.2 GiB of 80 GiB: fits" in zero3

    assert main([LLAMA, "--check", "--accelerate-config", "accelerate_configs/ddp.yaml", "--processes", "1",
                 "--device-memory-gib", "80"]) == 1
    ddp = capsys.readouterr()
    assert "weights: 13.98 GiB" in ddp.out and "DDP gradient buckets: 13.98 GiB" in ddp.out
    assert "estimated per device: 85.6 GiB of 80 GiB: does NOT fit" in ddp.out
    assert "exceeds 80 GiB" in ddp.err
