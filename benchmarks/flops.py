"""Model FLOPs of training, achieved FLOP/s and model FLOPs utilization (MFU).

Training FLOPs per token follow the PaLM paper (Chowdhery et al. 2022, appendix B):

    flops_per_token = 6 * N + 12 * L * H * Q * T

- `6 * N`: a matmul weight costs 2 FLOPs per token forward and 4 backward (input and weight gradients).
  N counts the *non-embedding* parameters (Kaplan et al. 2020; PaLM and Chinchilla count FLOPs the same
  way): an embedding lookup does no multiply-add. The classification head and pooler are included.
- `12 * L * H * Q * T`: attention scores Q.K^T and the weighted sum over V, 2 matmuls of T x Q per head
  and layer, again x3 for forward + backward. L layers, H query heads, Q head dimension, T sequence length.

MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the device. Only real (non-padding) tokens count as
model FLOPs, so padding shows up as lost utilization. A CPU has no MFU here (no agreed peak): report the
achieved FLOP/s instead. With LoRA the frozen weights get no weight gradient (about 4N, not 6N), so MFU
computed with 6N overstates such a run by up to 1.5x; the convention is kept so numbers compare with papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig


@dataclass(frozen=True)
class PeakFlops:
    """Peak dense (no sparsity) bf16 tensor FLOP/s of one accelerator, with where the figure comes from."""

    match: str
    tflops: float
    source: str


# First match on the device name wins, so the specific names come before the family name.
PEAK_BF16 = (
    PeakFlops("H200", 989.0, "NVIDIA H200 datasheet: 1,979 TFLOPS BF16 with 2:4 sparsity, half of it dense"),
    PeakFlops("H100 PCIe", 756.0, "NVIDIA H100 datasheet: 1,513 TFLOPS BF16 with 2:4 sparsity (PCIe), half dense"),
    PeakFlops("H100", 989.0, "NVIDIA H100 datasheet: 1,979 TFLOPS BF16 with 2:4 sparsity (SXM), half dense"),
    PeakFlops("A100", 312.0, "NVIDIA A100 datasheet: 312 TFLOPS BF16 dense"),
    PeakFlops(
        "910B", 320.0,
        "UNOFFICIAL: third-party write-ups quote about 320 TFLOPS FP16 for Ascend 910B (e.g. boardor.com "
        "'Huawei Ascend 910B outperforms H20'); Huawei publishes no per-variant BF16 figure; assumed equal to FP16",
    ),
)


@dataclass(frozen=True)
class TransformerShape:
    """What the FLOP formula needs to know about a model."""

    non_embedding_params: int
    layers: int
    heads: int
    head_dim: int


def count_non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside `nn.Embedding` modules (shared tensors counted once, as `parameters()` does)."""
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding)


def shape_of(model: torch.nn.Module, config: PretrainedConfig) -> TransformerShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return TransformerShape(
        count_non_embedding_parameters(model), config.num_hidden_layers, config.num_attention_heads, head_dim
    )


def shape_from_pretrained(name_or_path: str, num_labels: int) -> TransformerShape:
    """The shape of a sequence classifier from its config alone: built on the meta device, no weights read."""
    config = AutoConfig.from_pretrained(name_or_path, num_labels=num_labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return shape_of(model, config)


def training_flops_per_token(shape: TransformerShape, seq_len: float) -> float:
    """6N + 12 L H Q T: forward + backward FLOPs per token at sequence length T (PaLM appendix B)."""
    return 6 * shape.non_embedding_params + 12 * shape.layers * shape.heads * shape.head_dim * seq_len


def training_flops(shape: TransformerShape, tokens: int, sequences: int) -> float:
    """FLOPs to train on `tokens` tokens in `sequences` sequences, T taken as their mean length.

    The mean slightly undercounts attention for mixed lengths (sum of T^2 >= n * mean^2); the 6N term,
    which dominates at these lengths, is exact.
    """
    if sequences == 0:
        return 0.0
    return tokens * training_flops_per_token(shape, tokens / sequences)


def peak_bf16_flops(device_name: str) -> Optional[PeakFlops]:
    """The table entry for this accelerator name (e.g. `NVIDIA H100 80GB HBM3`), or None (CPU, unknown device)."""
    for peak in PEAK_BF16:
        if peak.match.lower() in device_name.lower():
            return peak
    return None


def model_flops_utilization(achieved_flops_per_s: float, peak: Optional[PeakFlops], devices: int = 1) -> Optional[float]:
    """Achieved model FLOP/s over the peak of `devices` such accelerators; None without a peak."""
    if peak is None:
        return None
    return achieved_flops_per_s / (peak.tflops * 1e12 * devices)
