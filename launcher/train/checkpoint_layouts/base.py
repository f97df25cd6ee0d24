"""The interface every checkpoint layout answers: which engine writes it, whether a folder holds it, the full
weights in it, and what loading it on another number of processes takes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from accelerate.utils import DistributedType


@dataclass(frozen=True)
class StateSource:
    """Where Accelerate's `load_state` reads a checkpoint's model and optimizer state on this run's world size."""

    folder: Path
    """The checkpoint itself, or a resharded copy of its state."""
    deepspeed_config: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed config entries that reading `folder` needs, set before the engine is built."""
    note: Optional[str] = None
    """What resharding did, for the plan."""


class CheckpointLayout(ABC):
    """How one engine's `save_state` lays out model and optimizer state. Stateless: each method takes the
    checkpoint folder and returns what it found."""

    name: ClassVar[str]
    """What the layout is, in a message."""

    @abstractmethod
    def written_under(self, distributed_type: DistributedType) -> bool:
        """Whether Accelerate writes (and reads) this layout under `distributed_type`."""

    @abstractmethod
    def holds(self, folder: Path) -> bool:
        """Whether the checkpoint `folder` holds its state in this layout."""

    @abstractmethod
    def full_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        """The model's full weights, on the CPU, without any process group."""

    def state_for_world_size(self, folder: Path, saved_world: int, world: int) -> StateSource:
        """The state of a checkpoint written by `saved_world` processes, for `world` processes; called before any
        process group exists. By default the state is whole, or sharded in a form its engine reshards as it reads."""
        return StateSource(folder)
