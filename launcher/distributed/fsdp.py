"""FSDP2 (`fully_shard`) on CPU processes over gloo, which Accelerate does not set up by itself.

Needed with Accelerate 1.15 and 1.16 (measured with torch 2.13; re-check on every release):
`accelerate launch --config_file accelerate_configs/fsdp2.yaml` with CPU processes (ACCELERATE_USE_CPU=true)
builds the FSDP plugin but `AcceleratorState` only turns a MULTI_GPU / MULTI_NPU / ... group into FSDP
(accelerate/state.py, the list before `DistributedType.FSDP`, unchanged in 1.16): a MULTI_CPU group keeps
DistributedType.MULTI_CPU and trains plain DDP, silently. torch's own `fully_shard` runs on a CPU device mesh
over gloo (its parameters become DTensor shards, full state dicts gather). So on CPU the launcher finishes what
Accelerate skipped: the same state `AcceleratorState` would set on GPUs, after which Accelerate's own FSDP2 code
prepares, exports and checkpoints the model.
"""

from __future__ import annotations

import os

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (or --use_fsdp) says so to every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_left_out_on_cpu(accelerator: Accelerator) -> bool:
    """A CPU group that was launched for FSDP but that Accelerate left a plain (DDP) MULTI_CPU group."""
    return fsdp_requested() and accelerator.state.distributed_type == DistributedType.MULTI_CPU


def launched_fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """The plugin of this launch, from the FSDP_* variables accelerate launch set."""
    return FullyShardedDataParallelPlugin()


def complete_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Make the CPU group an FSDP group with `plugin` (FSDP2), as AcceleratorState does for GPU groups."""
    state = accelerator.state
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # Each later `AcceleratorState()` copies PartialState's fields over its own: record FSDP there as well.
    PartialState().distributed_type = DistributedType.FSDP
