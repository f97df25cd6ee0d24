"""FSDP, in the two forms Accelerate's `save_state` writes: the full state dict gathered into one file
(`fsdp_state_dict_type: FULL_STATE_DICT`), or each rank's shards written with `torch.distributed.checkpoint`
(`SHARDED_STATE_DICT`, accelerate_configs/fsdp2.yaml's). Accelerate reads a checkpoint in the form the run's plugin
writes, so each form is its own layout: a checkpoint in the other one is refused before anything loads.

Both load on any number of processes as they are: a full state dict is scattered to the new shards, and
`torch.distributed.checkpoint` plans its reads from the shards the loading processes hold, whatever wrote the
files (measured with torch 2.13 and Accelerate 1.16: 2 -> 1 and 1 -> 2 CPU processes, FSDP2). Per-rank files
(`LOCAL_STATE_DICT`, or Accelerate's `use_dcp=False`) are neither: nothing reshards them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, merge_fsdp_weights
from safetensors.torch import load_file

from launcher.train.checkpoint_layouts.base import CheckpointLayout, StateSource

FULL = "pytorch_model_fsdp.bin"
SHARDS = "pytorch_model_fsdp_0"
MERGED_WEIGHTS = "model.safetensors"


class FsdpState(CheckpointLayout):
    """What both forms share: the run's plugin writes them by its state dict type, a folder holds them by name."""

    state_dict_type: ClassVar[str]
    written: ClassVar[str]
    """The file or folder Accelerate writes the model's state to."""

    def written_by(self, accelerator: Accelerator) -> bool:
        return (accelerator.distributed_type == DistributedType.FSDP
                and accelerator.state.fsdp_plugin.state_dict_type.name == self.state_dict_type)

    def holds(self, folder: Path) -> bool:
        return (folder / self.written).exists()


class FsdpFull(FsdpState):
    name = f"an FSDP full state dict ({FULL}, FULL_STATE_DICT)"
    state_dict_type = "FULL_STATE_DICT"
    written = FULL

    def full_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        return torch.load(folder / FULL, map_location="cpu", weights_only=True)

    def resharded(self, folder: Path, saved_world: int, accelerator: Accelerator) -> StateSource:
        return StateSource(folder, f"FSDP full state dict written by {saved_world} process(es) loads on "
                                   f"{accelerator.num_processes}: it is sharded anew")


class FsdpSharded(FsdpState):
    name = f"FSDP shards ({SHARDS}/, SHARDED_STATE_DICT through torch.distributed.checkpoint)"
    state_dict_type = "SHARDED_STATE_DICT"
    written = SHARDS

    def full_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        with tempfile.TemporaryDirectory() as merged:
            merge_fsdp_weights(str(folder / SHARDS), merged)
            return load_file(str(Path(merged) / MERGED_WEIGHTS))

    def resharded(self, folder: Path, saved_world: int, accelerator: Accelerator) -> StateSource:
        return StateSource(folder, f"FSDP shards written by {saved_world} process(es) load on "
                                   f"{accelerator.num_processes}: torch.distributed.checkpoint reshards them as it reads")
