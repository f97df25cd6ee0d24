"""Checkpoint layouts, one module per way an engine's `save_state` lays out model and optimizer state: whole state
in one file (one process, DDP), FSDP's full state dict or its shards, DeepSpeed ZeRO partitions. Chosen from a
checkpoint's files (`layout_of`) or from the Accelerator of a run (`layout_written_by`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from launcher.train.checkpoint_layouts.base import CheckpointLayout, StateSource
from launcher.train.checkpoint_layouts.deepspeed import DeepSpeedZero
from launcher.train.checkpoint_layouts.fsdp import FsdpFull, FsdpSharded
from launcher.train.checkpoint_layouts.one_file import OneFile
from launcher.train.checkpoints import CheckpointError

LAYOUTS: tuple[CheckpointLayout, ...] = (OneFile(), FsdpFull(), FsdpSharded(), DeepSpeedZero())


def layout_of(folder: Path) -> Optional[CheckpointLayout]:
    """The layout of the state in checkpoint `folder`, or None when it is none of the known ones."""
    return next((layout for layout in LAYOUTS if layout.holds(folder)), None)


def layout_written_by(accelerator: Accelerator) -> Optional[CheckpointLayout]:
    """The layout `accelerator`'s `save_state` writes, or None when it is none of the known ones (per-rank files)."""
    return next((layout for layout in LAYOUTS if layout.written_by(accelerator)), None)


def full_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The model's full weights from a checkpoint, whichever engine wrote it (`launcher.predict` serves them)."""
    layout = layout_of(folder)
    if layout is None:
        raise CheckpointError(f"{folder}: holds none of these: {'; '.join(known.name for known in LAYOUTS)}; "
                              "not a checkpoint of this launcher")
    return layout.full_state_dict(folder)
