"""One process, or data parallel (DDP) on any device: every rank holds whole state, written once
(`model.safetensors`, `optimizer.bin`). Nothing depends on the number of processes."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from launcher.train.checkpoint_layouts.base import CheckpointLayout

WEIGHTS = "model.safetensors"


class OneFile(CheckpointLayout):
    name = f"whole state in one file ({WEIGHTS}: one process or DDP)"

    def written_by(self, accelerator: Accelerator) -> bool:
        return accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    def holds(self, folder: Path) -> bool:
        return (folder / WEIGHTS).is_file()

    def full_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / WEIGHTS))
