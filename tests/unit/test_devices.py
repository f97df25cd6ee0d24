"""Device selection, collective backend, visible devices, precision support and RNG seeding.

No Ascend NPU and no torch_npu exist on this machine, so the NPU tests *simulate* what importing torch_npu
does: a stand-in module in sys.modules, a `torch.npu` namespace reporting a chip name, the devices that
ASCEND_RT_VISIBLE_DEVICES exposes and the seeds it receives, and torch's accelerator registry reporting `npu`.
What runs for real against the stand-in is the launcher's device layer and Accelerate's own NPU detection,
backend choice and seeding (Accelerate <= 1.15 probes torch_npu and `torch.npu` itself; 1.16 asks torch's
registry, accelerate/utils/imports.py `get_torch_accelerator_backend`); nothing here shows that torch_npu,
CANN or HCCL behave as simulated on real hardware.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types

import pytest
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, set_seed
from accelerate.utils import imports as accelerate_imports

from launcher.distributed.accelerator import LaunchError, check_local_processes
from launcher.distributed.devices import (
    PrecisionError, detect_device, native_bf16, peak_allocated_bytes, precision_note, resolve_precision, supports,
)


class SimulatedNpuRuntime:
    """What torch_npu registers as `torch.npu`, reduced to the calls the launcher and Accelerate make."""

    def __init__(self, chip: str, physical_devices: int = 8):
        self.chip = chip
        self.physical_devices = physical_devices
        self.seeds: list[int] = []

    def device_count(self) -> int:
        # The driver hides the devices ASCEND_RT_VISIBLE_DEVICES does not list, as CUDA_VISIBLE_DEVICES does.
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        return len(visible.split(",")) if visible else self.physical_devices

    def is_available(self) -> bool:
        return self.device_count() > 0

    def get_device_name(self, index: int = 0) -> str:
        return self.chip

    def manual_seed_all(self, seed: int) -> None:
        self.seeds.append(seed)

    def max_memory_allocated(self) -> int:
        return 3 * 2**30


def register_as_torch_accelerator(runtime: SimulatedNpuRuntime, monkeypatch) -> None:
    """torch_npu's import renames torch's PrivateUse1 backend to `npu`: `torch.accelerator.current_accelerator()`
    then reports it (before CUDA) and `torch.get_device_module("npu")` resolves to `torch.npu`. The rename holds for
    the rest of the process and would leave every later test on a vanished NPU, so the simulation answers these
    two public calls instead; their device stand-in has only the `type` a torch.device("npu") would have."""
    npu = types.SimpleNamespace(type="npu", index=None)
    get_device_module = torch.get_device_module

    def current_accelerator(check_available: bool = False):
        return npu if not check_available or runtime.is_available() else None

    def device_module(device=None):
        names_npu = str(getattr(device, "type", device)).split(":")[0] == "npu"
        return runtime if names_npu else get_device_module(device)

    monkeypatch.setattr(torch.accelerator, "current_accelerator", current_accelerator)
    monkeypatch.setattr(torch, "get_device_module", device_module)


def clear_accelerate_detection_caches() -> None:
    for name in ("is_npu_available", "is_xpu_available", "is_mlu_available", "is_sdaa_available", "is_musa_available",
                 "is_hpu_available", "is_neuron_available"):
        getattr(accelerate_imports, name).cache_clear()


@pytest.fixture
def simulated_npu(monkeypatch, request) -> SimulatedNpuRuntime:
    """A machine with 8 simulated Ascend NPUs (chip name from the test's `chip` param, default 910B3), no CUDA."""
    runtime = SimulatedNpuRuntime(getattr(request, "param", "Ascend910B3"))
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", runtime, raising=False)
    register_as_torch_accelerator(runtime, monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    clear_accelerate_detection_caches()
    yield runtime
    clear_accelerate_detection_caches()


def test_cpu_machine_trains_on_cpu_over_gloo():
    device = detect_device()
    assert (device.type, device.count, device.backend) == ("cpu", 1, "gloo")
    assert supports(device, "fp32") and not supports(device, "fp16")


def test_npu_is_detected_with_the_hccl_backend_accelerate_also_picks(simulated_npu, monkeypatch):
    device = detect_device()
    assert (device.type, device.count, device.name, device.backend) == ("npu", 8, "Ascend910B3", "hccl")
    # Accelerate must agree, or PartialState would not form the HCCL group the launcher plans for.
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert PartialState._prepare_backend(PartialState, cpu=False) == ("hccl", DistributedType.MULTI_NPU)


def test_ascend_visible_devices_limit_the_processes_per_machine(simulated_npu, monkeypatch):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    device = detect_device()
    assert device.count == 2
    check_local_processes(device, 2)
    with pytest.raises(LaunchError, match=r"8 processes on this machine but 2 npu device\(s\) are visible "
                                          r"\(ASCEND_RT_VISIBLE_DEVICES=4,5\)"):
        check_local_processes(device, 8)


def test_cpu_processes_are_not_limited_by_devices():
    check_local_processes(detect_device(), 4)


@pytest.mark.parametrize(
    ("simulated_npu", "bf16"),
    [("Ascend910B3", True), ("Ascend910_9391", True), ("Ascend910A", False), ("Ascend910ProB", False)],
    indirect=["simulated_npu"],
)
def test_bf16_only_on_910b_and_later(simulated_npu, bf16):
    device = detect_device()
    assert supports(device, "bf16") is bf16
    assert supports(device, "fp16")
    if not bf16:
        with pytest.raises(PrecisionError, match="training.precision=bf16 is not supported on npu"):
            resolve_precision(device, "bf16", allow_fallback=False)


@pytest.mark.parametrize(("avx512_bf16", "amx"), [(False, False), (True, False), (False, True)])
def test_cpu_runs_bf16_everywhere_and_says_when_it_is_converted(monkeypatch, avx512_bf16, amx):
    """CPU autocast computes bf16 on any CPU; only AVX-512 BF16 or AMX make it native, and the plan says when not."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = detect_device()
    assert supports(cpu, "bf16") and not supports(cpu, "fp16")
    assert resolve_precision(cpu, "bf16", allow_fallback=False) == "bf16"
    assert native_bf16(cpu) is (avx512_bf16 or amx)
    note = precision_note(cpu, "bf16")
    assert (note is None) is (avx512_bf16 or amx)
    assert note is None or "slower than fp32" in note
    assert precision_note(cpu, "fp32") is None
    with pytest.raises(PrecisionError, match="training.precision=fp16 is not supported on cpu"):
        resolve_precision(cpu, "fp16", allow_fallback=False)


def test_seeding_reaches_the_npu_generators(simulated_npu):
    """The run seeds through Accelerate's set_seed; on an NPU machine it must seed every NPU's generator too,
    or dropout and the head's init would differ between processes and reruns."""
    set_seed(1234)
    assert simulated_npu.seeds == [1234]
    assert torch.initial_seed() == 1234


def test_peak_memory_comes_from_the_device_allocator_and_is_none_on_cpu(simulated_npu):
    assert peak_allocated_bytes("npu") == 3 * 2**30
    assert peak_allocated_bytes("cpu") is None  # host memory is the harness's RSS watch
