"""The seam between the training machinery and what is being learned.

A task decides what differs between kinds of fine-tuning: the model class, how rows become tokens and training
targets, how many loss items a batch holds, the loss, the evaluation and what the export carries besides the
weights. The loop, checkpoints, topologies and Slurm never ask which task runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import torch
from accelerate import Accelerator
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from launcher.data.sources import Splits
from launcher.recipe.schema import Recipe

Batch = dict[str, torch.Tensor]
Collator = Callable[[list[dict[str, Any]]], Batch]


class Task(ABC):
    """One kind of fine-tuning, built once from the recipe (`launcher.tasks.build_task`)."""

    model_class: Any
    """The transformers auto class the model is loaded with."""
    peft_task_type: TaskType
    """What peft is told the model does (which modules it keeps trainable besides the adapters)."""

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase):
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.notes: list[str] = []
        """Lines for the run plan that the data preparation found (dropped rows, label words...)."""

    serves_predictions = False
    """`launcher.predict` serves its models (the task implements what it calls: `prediction_columns`, `score`...)."""
    output_files: tuple[str, ...] = ()
    """What the task writes into the run directory besides the loop's outputs (plots, generations)."""

    @classmethod
    @abstractmethod
    def columns(cls, recipe: Recipe) -> list[str]:
        """The dataset columns this task reads (known before a tokenizer is loaded)."""

    @classmethod
    @abstractmethod
    def describe(cls, recipe: Recipe) -> str:
        """What is learned, in a few words, for the run plan."""

    @classmethod
    def planned_config(cls, recipe: Recipe) -> dict[str, Any]:
        """Model config values that shape the model before any data is read (a classifier's head size), for the
        memory plan's model built on the meta device."""
        return {}

    @classmethod
    def memory_rows(cls, recipe: Recipe, vocab_size: int) -> dict[str, float]:
        """Per-device bytes the task adds to the memory plan's rows (named), besides weights, states, activations."""
        return {}

    @abstractmethod
    def prepare_data(self, splits: Splits) -> Splits:
        """Raw rows in, tokenized rows out (`input_ids` and the task's training targets)."""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments (label names for a classifier)."""
        return {}

    def adapt_model(self, model: torch.nn.Module) -> None:
        """Let the loaded (and LoRA-wrapped) model take this task's batches; by default it takes them as they are."""

    def class_ids(self, train: datasets.Dataset) -> Optional[list[int]]:
        """Each training example's class, for batches that keep the class mix; None where there are no classes."""
        return None

    @abstractmethod
    def collators(self) -> tuple[Collator, Collator]:
        """(training collator, evaluation collator)."""

    @abstractmethod
    def loss_items(self, batch: Batch, counted: torch.Tensor) -> int:
        """How many things the loss of `batch` sums over (examples, or trained tokens) in its `counted` examples
        (a bool per example, in batch order; the others are repeats that give every rank a batch)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch, counted: torch.Tensor) -> torch.Tensor:
        """The loss summed over the `loss_items` of the `counted` examples: 0 where there are none, still reaching
        every trained weight (a rank whose batch counts nothing still joins the gradient all-reduce)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        """Loss and metrics over the whole eval set, identical on every rank (gathered exactly)."""

    def after_evaluation(self, model: torch.nn.Module, accelerator: Accelerator, step: int, run_dir: Path) -> None:
        """Anything written beside an evaluation (generated samples); every rank calls it."""
