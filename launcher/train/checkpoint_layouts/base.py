"""The interface every checkpoint layout answers: whether a run writes it, whether a folder holds it, the full
weights in it, and what loading it on another number of processes takes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from accelerate import Accelerator


@dataclass(frozen=True)
class StateSource:
    """Where Accelerate's `load_state` reads a checkpoint's model and optimizer state on this run's world size."""

    folder: Path
    """The checkpoint itself, or a resharded copy of its state."""
    note: Optional[str] = None
    """What resharding did, for the plan."""


class CheckpointLayout(ABC):
    """How one engine's `save_state` lays out model and optimizer state. Holds nothing: each method takes the
    checkpoint folder (and the run's Accelerator) and returns what it found."""

    name: ClassVar[str]
    """What the layout is, in a message."""

    @abstractmethod
    def written_by(self, accelerator: Accelerator) -> bool:
        """Whether `accelerator`'s `save_state` writes this layout (and so its `load_state` reads it)."""

    @abstractmethod
    def holds(self, folder: Path) -> bool:
        """Whether the checkpoint `folder` holds its state in this layout."""

    @abstractmethod
    def full_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        """The model's full weights, on the CPU, without any process group."""

    def resharded(self, folder: Path, saved_world: int, accelerator: Accelerator) -> StateSource:
        """The state of a checkpoint written by `saved_world` processes, for `accelerator`'s; called after the
        Accelerator is built and before anything is prepared, so no rank waits in a collective meanwhile. By
        default the state is whole, or sharded in a form its engine reshards as it reads."""
        return StateSource(folder, f"{self.name} written by {saved_world} process(es) loads on "
                                   f"{accelerator.num_processes} as it is")
