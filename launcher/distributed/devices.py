"""What hardware this process trains on, what precision it supports and which collective backend it uses."""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from launcher.recipe.schema import Precision

DeviceType = Literal["cuda", "npu", "cpu"]
BACKEND_BY_DEVICE: dict[DeviceType, str] = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
# The variable each driver reads to restrict the devices a process sees (Accelerate's gpu_ids sets it).
VISIBLE_DEVICES_VARIABLE: dict[DeviceType, str] = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
BF16_NPU_PREFIXES = ("Ascend910B", "Ascend910_93")


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

    def visibility(self) -> str:
        """How the devices were restricted, for messages: `ASCEND_RT_VISIBLE_DEVICES=0,1` or `all`."""
        variable = VISIBLE_DEVICES_VARIABLE.get(self.type)
        return f"{variable}={os.environ[variable]}" if variable and variable in os.environ else "all visible"


def npu_available() -> bool:
    """Ascend NPU through torch_npu. Importing it registers `torch.npu` and names torch's PrivateUse1 backend
    `npu`, which Accelerate >= 1.16 reads (`torch.accelerator.current_accelerator()`) without importing torch_npu
    itself: with TORCH_DEVICE_BACKEND_AUTOLOAD=0 only this import, made before the Accelerator is built, lets
    Accelerate pick the NPUs and HCCL."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch_npu  # noqa: F401  (import registers the npu device with torch)
    except Exception:  # noqa: BLE001  torch_npu installed where the CANN driver is not (a CPU container) fails here
        return False
    return torch.npu.is_available()


def npu_supports_bf16() -> bool:
    """bf16 needs an Atlas A2/A3 chip (Ascend910B*, Ascend910_93*); the first-generation 910A / 910ProB and the
    310 inference chips compute in fp16 only. Decided by the chip name torch_npu reports for device 0."""
    return torch.npu.get_device_name(0).startswith(BF16_NPU_PREFIXES)


def detect_device() -> DeviceInfo:
    if torch.cuda.is_available():
        return DeviceInfo("cuda", torch.cuda.device_count(), torch.cuda.get_device_name(0))
    if npu_available():
        return DeviceInfo("npu", torch.npu.device_count(), torch.npu.get_device_name(0))
    return DeviceInfo("cpu", 1, "cpu")


def supports(device: DeviceInfo, precision: Precision) -> bool:
    if precision == "fp32":
        return True
    if device.type in ("cuda", "npu"):
        return native_bf16(device) if precision == "bf16" else True
    # CPU autocast computes bf16 on every CPU (natively with AVX-512 BF16 or AMX, elsewhere by converting to fp32:
    # correct, slower; see precision_note). fp16 autocast on CPU is emulated and slow, so it is refused there.
    return precision == "bf16"


def native_bf16(device: DeviceInfo) -> bool:
    """Whether the hardware does bf16 arithmetic itself rather than through conversions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "npu":
        return npu_supports_bf16()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def precision_note(device: DeviceInfo, precision: Precision) -> Optional[str]:
    """A line for the run plan when the precision runs, but slowly, on this hardware."""
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        return ("bf16 on this CPU (no AVX-512 BF16 or AMX) runs through fp32 conversions: expect it slower than fp32 "
                "(3.7x slower measured on an AVX-512 Xeon, docs/benchmarks.md)")
    return None


def resolve_precision(device: DeviceInfo, precision: Precision, allow_fallback: bool) -> Precision:
    """The precision to run at: the recipe's, or fp32 with a warning when allowed and the hardware lacks it."""
    if supports(device, precision):
        return precision
    message = f"training.precision={precision} is not supported on {device.type} ({device.name})"
    if not allow_fallback:
        raise PrecisionError(f"{message}; use fp32 or set training.precision_fallback=true")
    warnings.warn(f"{message}; falling back to fp32 (training.precision_fallback=true)", stacklevel=2)
    return "fp32"


def peak_allocated_bytes(device_type: str) -> Optional[int]:
    """The device allocator's high-water mark in this process; None on CPU, whose peak (RSS) is watched from outside."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    if device_type == "npu":
        return torch.npu.max_memory_allocated()
    return None
