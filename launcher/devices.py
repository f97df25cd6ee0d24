"""What hardware this process trains on, what precision it supports and which collective backend it uses."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from launcher.recipe import Precision

DeviceType = Literal["cuda", "npu", "cpu"]
BACKEND_BY_DEVICE: dict[DeviceType, str] = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


class PrecisionError(RuntimeError):
    """The recipe's precision cannot run on this hardware and no fallback was allowed."""


@dataclass(frozen=True)
class DeviceInfo:
    type: DeviceType
    count: int
    name: str

    @property
    def backend(self) -> str:
        return BACKEND_BY_DEVICE[self.type]


def npu_available() -> bool:
    """Ascend NPU through torch_npu (importing it registers `torch.npu`)."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (import registers the npu device with torch)

    return torch.npu.is_available()


def detect_device() -> DeviceInfo:
    if torch.cuda.is_available():
        return DeviceInfo("cuda", torch.cuda.device_count(), torch.cuda.get_device_name(0))
    if npu_available():
        return DeviceInfo("npu", torch.npu.device_count(), torch.npu.get_device_name(0))
    return DeviceInfo("cpu", 1, "cpu")


def supports(device: DeviceInfo, precision: Precision) -> bool:
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported() if precision == "bf16" else True
    if device.type == "npu":
        return torch.npu.is_bf16_supported() if precision == "bf16" else True
    # Accelerate reports bf16 as available on every CPU; oneDNN knows whether the CPU has bf16 kernels.
    # fp16 autocast on CPU is emulated and slow, so it is refused there.
    return precision == "bf16" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(device: DeviceInfo, precision: Precision, allow_fallback: bool) -> Precision:
    """The precision to run at: the recipe's, or fp32 with a warning when allowed and the hardware lacks it."""
    if supports(device, precision):
        return precision
    message = f"training.precision={precision} is not supported on {device.type} ({device.name})"
    if not allow_fallback:
        raise PrecisionError(f"{message}; use fp32 or set training.precision_fallback=true")
    warnings.warn(f"{message}; falling back to fp32 (training.precision_fallback=true)", stacklevel=2)
    return "fp32"
