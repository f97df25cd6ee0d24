"""FSDP: the full state dict gathered into one file (`fsdp_state_dict_type: FULL_STATE_DICT`), or state sharded
by rank and written with `torch.distributed.checkpoint` (`SHARDED_STATE_DICT`).

Both load on any number of processes as they are: a full state dict is scattered to the new shards, and
`torch.distributed.checkpoint` plans its reads from the shards the loading processes hold, whatever wrote the
files (measured with torch 2.13 and Accelerate 1.16: 2 -> 1 and 1 -> 2 CPU processes, FSDP2, both state dict
types). Per-rank files (`LOCAL_STATE_DICT`, or Accelerate's `use_dcp=False`) are not this layout: nothing
reshards them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from accelerate.utils import DistributedType, merge_fsdp_weights
from safetensors.torch import load_file

from launcher.train.checkpoint_layouts.base import CheckpointLayout, StateSource

FULL = "pytorch_model_fsdp.bin"
SHARDS = "pytorch_model_fsdp_0"
MERGED_WEIGHTS = "model.safetensors"


class FsdpState(CheckpointLayout):
    name = f"FSDP state ({FULL}, or {SHARDS}/ written by torch.distributed.checkpoint)"

    def written_under(self, distributed_type: DistributedType) -> bool:
        return distributed_type == DistributedType.FSDP

    def holds(self, folder: Path) -> bool:
        return (folder / FULL).is_file() or (folder / SHARDS).is_dir()

    def full_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        if (folder / FULL).is_file():
            return torch.load(folder / FULL, map_location="cpu", weights_only=True)
        with tempfile.TemporaryDirectory() as merged:
            merge_fsdp_weights(str(folder / SHARDS), merged)
            return load_file(str(Path(merged) / MERGED_WEIGHTS))

    def state_for_world_size(self, folder: Path, saved_world: int, world: int) -> StateSource:
        how = ("the full state dict is sharded anew" if (folder / FULL).is_file()
               else "torch.distributed.checkpoint reshards it as it reads")
        return StateSource(folder, note=f"FSDP state written by {saved_world} process(es) loads on {world}: {how}")
