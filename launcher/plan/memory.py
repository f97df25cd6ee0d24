"""Preflight estimate of the memory one device needs for a recipe on a topology (an accelerate config and a
process count): weights, gradients, optimizer states, optimizer-step temporaries, DDP buckets or ZeRO/FSDP
gathered layers, activations and runtime overhead, and what ZeRO offload moves to host memory.

Parameter counts are exact: the recipe's model (with its LoRA adapters) is built on the meta device from its
config.json, which needs no weights; a hub id that is neither a local folder nor in the local cache is looked
up in KNOWN_CONFIGS. Everything else is an estimate from published accounting (below); real peaks also
depend on allocator fragmentation, kernels and padding, so leave headroom.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType
from transformers import AutoConfig, BertConfig, LlamaConfig, PretrainedConfig

from launcher.distributed.accelerator import LaunchError, launched_world_size
from launcher.model.loading import apply_lora, count_parameters
from launcher.recipe.schema import Recipe
from launcher.tasks import task_class

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# CUDA/NPU context, collective library buffers, allocator slack: measured contexts are 0.5-1 GiB.
RUNTIME_OVERHEAD_BYTES = 1 * GIB

# Public config.json values of hub models the recipes name, for planning without network or cache.
KNOWN_CONFIGS: dict[str, PretrainedConfig] = {
    name: LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False)
    for name in ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct")
} | {
    "bert-base-cased": BertConfig(vocab_size=28996),
    "bert-base-uncased": BertConfig(vocab_size=30522),
}

Strategy = Literal["single", "ddp", "fsdp", "deepspeed"]


class MemoryPlanError(LaunchError):
    """The topology or the model's shape cannot be read."""


@dataclass(frozen=True)
class Topology:
    """How the processes share the model: what `--accelerate-config` and `--processes` describe."""

    strategy: Strategy
    processes: int
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    device_memory_gib: Optional[float] = None

    def describe(self) -> str:
        if self.strategy == "deepspeed":
            offload = [name for name, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
            kind = f"DeepSpeed ZeRO-{self.zero_stage}" + (f" (offload {' + '.join(offload)} to CPU)" if offload else "")
        else:
            kind = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP full shard"}[self.strategy]
        memory = f", {self.device_memory_gib:g} GiB per device" if self.device_memory_gib else ""
        return f"{self.processes} process(es), {kind}{memory}"


@dataclass(frozen=True)
class ModelSize:
    """Exact parameter counts of the model the recipe trains, and the shapes activations scale with."""

    total: int
    trainable: int
    largest_gathered: int
    """Parameters of the biggest unit ZeRO-3 / FSDP gathers at once (a transformer layer or the embedding)."""
    hidden_size: int
    layers: int
    heads: int
    source: str
    vocab_size: int


@dataclass
class MemoryEstimate:
    device_bytes: dict[str, float]
    host_bytes: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def device_total(self) -> float:
        return sum(self.device_bytes.values())


def load_topology(config_file: Optional[str], processes: Optional[int], device_memory_gib: Optional[float]) -> Topology:
    """The topology an accelerate config file describes (no file: this launch's processes, DDP when more than
    one); `processes` overrides the file's num_processes as `accelerate launch --num_processes` does."""
    if config_file is None:
        count = processes or launched_world_size()
        return Topology("ddp" if count > 1 else "single", count, device_memory_gib=device_memory_gib)
    try:
        cluster = ClusterConfig.from_yaml_file(config_file)
    except (OSError, ValueError, TypeError) as err:
        raise MemoryPlanError(f"--accelerate-config {config_file}: {err}") from err
    count = processes or cluster.num_processes
    if cluster.distributed_type == DistributedType.DEEPSPEED:
        zero = deepspeed_settings(cluster.deepspeed_config).get("zero_optimization", {})
        return Topology(
            "deepspeed", count, zero_stage=int(zero.get("stage", 0)),
            offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none",
            offload_params=zero.get("offload_param", {}).get("device", "none") != "none",
            device_memory_gib=device_memory_gib,
        )
    if cluster.distributed_type == DistributedType.FSDP:
        return Topology("fsdp", count, device_memory_gib=device_memory_gib)
    return Topology("single" if cluster.distributed_type == DistributedType.NO else "ddp", count,
                    device_memory_gib=device_memory_gib)


def deepspeed_settings(accelerate_section: dict) -> dict:
    """The DeepSpeed config an accelerate file points at (deepspeed_config_file) or writes inline."""
    path = accelerate_section.get("deepspeed_config_file")
    if path is None:
        zero = {"stage": accelerate_section.get("zero_stage", 0),
                "offload_optimizer": {"device": accelerate_section.get("offload_optimizer_device", "none")},
                "offload_param": {"device": accelerate_section.get("offload_param_device", "none")}}
        return {"zero_optimization": zero}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MemoryPlanError(f"deepspeed_config_file {path} (relative to the working directory): {err}") from err


def model_config(name_or_path: str) -> tuple[PretrainedConfig, str]:
    """config.json from a local folder or the local hub cache, else the KNOWN_CONFIGS entry."""
    try:
        return AutoConfig.from_pretrained(name_or_path), "config.json"
    except (OSError, ValueError) as err:
        if name_or_path in KNOWN_CONFIGS:
            return copy.deepcopy(KNOWN_CONFIGS[name_or_path]), "launcher.plan.memory.KNOWN_CONFIGS"
        raise MemoryPlanError(
            f"{name_or_path}: no config.json reachable ({str(err).splitlines()[0]}) and not in KNOWN_CONFIGS; "
            "point model.name_or_path at a folder with config.json to plan memory"
        ) from err


def measure_model(recipe: Recipe) -> ModelSize:
    """Build the recipe's classifier (and LoRA) on the meta device and count its parameters exactly."""
    config, source = model_config(recipe.model.name_or_path)
    task = task_class(recipe)
    for name, value in task.planned_config(recipe).items():
        setattr(config, name, value)
    with torch.device("meta"):
        model = task.model_class.from_config(config)
        if recipe.lora.enabled:
            model = apply_lora(model, recipe.lora, task.peft_task_type)
    trainable, total = count_parameters(model)
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in layer_classes]
    largest = max(layers + [p.numel() for p in model.parameters()])
    return ModelSize(total, trainable, largest, config.hidden_size, config.num_hidden_layers,
                     config.num_attention_heads, source, config.vocab_size)


def estimate_memory(size: ModelSize, topology: Topology, recipe: Recipe) -> MemoryEstimate:
    if topology.strategy == "deepspeed":
        estimate = deepspeed_states(size, topology, recipe.training.precision)
    else:
        estimate = torch_states(size, topology, DTYPE_BYTES[recipe.model.load_dtype])
    estimate.device_bytes["activations"] = activation_bytes(size, recipe)
    estimate.device_bytes |= task_class(recipe).memory_rows(recipe, size.vocab_size, size.total)
    estimate.device_bytes["runtime overhead"] = RUNTIME_OVERHEAD_BYTES
    return estimate


def torch_states(size: ModelSize, topology: Topology, weight_bytes: int) -> MemoryEstimate:
    """Plain PyTorch (one process, DDP, FSDP): parameters, gradients and AdamW's two states all in the weights'
    dtype (no fp32 master copy); DDP adds its gradient buckets (Accelerate keeps gradient_as_bucket_view off);
    torch's foreach AdamW materialises sqrt(v) for all parameters during the step. FSDP shards all of it."""
    shards = topology.processes if topology.strategy == "fsdp" else 1
    P, T = size.total, size.trainable
    device = {
        "weights": weight_bytes * P / shards,
        "gradients": weight_bytes * T / shards,
        "optimizer states (AdamW m, v)": 2 * weight_bytes * T / shards,
        "optimizer step temporaries": weight_bytes * T / shards,
    }
    if topology.strategy == "ddp":
        device["DDP gradient buckets"] = weight_bytes * T
    if topology.strategy == "fsdp":
        device["gathered layers (current + prefetched)"] = 2 * weight_bytes * size.largest_gathered
    estimate = MemoryEstimate(device)
    if weight_bytes < 4 and T == P:
        estimate.notes.append("16-bit weights and AdamW states without fp32 master weights: updates below ~1/256 "
                              "of a weight round away; DeepSpeed (zero2/zero3 configs) keeps fp32 master weights")
    return estimate


def deepspeed_states(size: ModelSize, topology: Topology, precision: str) -> MemoryEstimate:
    """ZeRO accounting (Rajbhandari et al. 2020, section 3): mixed precision holds 16-bit weights and gradients
    (2 + 2 bytes) and K = 12 bytes of fp32 master weights, momentum and variance per trainable parameter;
    fp32 training holds 4 + 4 and K = 8. Stage 1 shards the optimizer states, stage 2 also the gradients,
    stage 3 also the weights, over the processes. The step's fp32 temporaries (sqrt(v)) add 4 bytes per
    sharded parameter; ZeRO-3 gathers whole layers for compute (prefetching the next)."""
    N, P, T, stage = topology.processes, size.total, size.trainable, topology.zero_stage
    half = precision in ("bf16", "fp16")
    weight_bytes = 2 if half else 4
    states = {
        "weights": weight_bytes * P / (N if stage >= 3 else 1),
        "gradients": weight_bytes * T / (N if stage >= 2 else 1),
        "optimizer states (fp32 master, m, v)" if half else "optimizer states (m, v)":
            (12 if half else 8) * T / (N if stage >= 1 else 1),
        "optimizer step temporaries": 4 * T / (N if stage >= 1 else 1),
    }
    estimate = MemoryEstimate({})
    offloaded = {"weights"} if topology.offload_params else set()
    if topology.offload_optimizer:
        offloaded |= {name for name in states if name.startswith("optimizer")}
    for name, value in states.items():
        (estimate.host_bytes if name in offloaded else estimate.device_bytes)[name] = value
    if stage >= 3:
        estimate.device_bytes["gathered layers (current + prefetched)"] = 2 * weight_bytes * size.largest_gathered
    return estimate


def activation_bytes(size: ModelSize, recipe: Recipe) -> float:
    """Korthikanti et al. 2022 (eq. 1): a transformer layer keeps 34*s*b*h bytes of 16-bit activations for
    backward, plus 5*a*s^2*b for materialised attention scores (eager attention only; SDPA / flash kernels do
    not keep them). With gradient checkpointing only each layer's 16-bit input stays (2*s*b*h) and one layer
    is recomputed at a time. s is data.max_length: an upper bound under dynamic padding."""
    b = recipe.training.per_device_batch_size * task_class(recipe).sequences_per_example  # a pair runs two
    s, h, a = recipe.data.max_length, size.hidden_size, size.heads
    scale = 1 if recipe.training.precision in ("bf16", "fp16") else 2  # fp32 activations are twice the bytes
    attention = 5 * a * s * s * b if recipe.model.attn_implementation == "eager" else 0
    layer = (34 * s * b * h + attention) * scale
    if recipe.model.gradient_checkpointing:
        return (size.layers * 2 * s * b * h) * scale + layer
    return size.layers * layer


def describe_memory(size: ModelSize, topology: Topology, estimate: MemoryEstimate) -> list[str]:
    """Lines for the plan: the parameter counts, each component in GiB, the total and the verdict."""
    lines = [f"{size.total / 1e9:.3f}B parameters, {size.trainable / 1e9:.3f}B trainable (shape from {size.source})"]
    lines += [f"{name}: {value / GIB:.2f} GiB" for name, value in estimate.device_bytes.items()]
    lines += [f"host (offloaded) {name}: {value / GIB:.2f} GiB per process" for name, value in estimate.host_bytes.items()]
    lines.append(f"estimated per device: {estimate.device_total / GIB:.1f} GiB" + verdict(topology, estimate))
    return lines + estimate.notes


def verdict(topology: Topology, estimate: MemoryEstimate) -> str:
    if topology.device_memory_gib is None:
        return " (give --device-memory-gib for a fit verdict)"
    needed = estimate.device_total / GIB
    word = "fits" if fits(topology, estimate) else "does NOT fit"
    return f" of {topology.device_memory_gib:g} GiB: {word} ({needed / topology.device_memory_gib:.0%})"


def fits(topology: Topology, estimate: MemoryEstimate) -> bool:
    return topology.device_memory_gib is None or estimate.device_total <= topology.device_memory_gib * GIB
