"""What a benchmark ran on: hardware, library versions, machine load. Every result file carries these."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Optional

import psutil
import torch

from launcher.distributed.devices import DeviceInfo

LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "peft", "torch_npu")
# Settings inherited by every run that change its speed without appearing on its command line.
SPEED_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES",
                     "ACCELERATE_USE_CPU", "DS_ACCELERATOR")


def cpu_model() -> str:
    """The marketing name of the CPU (platform.processor() is often just the architecture on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_1min() -> float:
    """Runnable processes averaged over the last minute: above the core count, runs share the CPU."""
    return os.getloadavg()[0]


def describe_machine(device: DeviceInfo) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "memory_bytes": psutil.virtual_memory().total,
        "device_type": device.type,
        "device_name": device.name,
        "device_count": device.count,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: v for name in LIBRARIES if (v := library_version(name))},
        "torch_threads": torch.get_num_threads(),
        "environment": {name: os.environ[name] for name in SPEED_ENVIRONMENT if name in os.environ},
    }
