"""The seam between the training machinery and what is being learned.

A task decides what differs between kinds of fine-tuning: the model class, how rows become tokens and training
targets, how many loss items a batch holds, the loss, the evaluation and what the run directory gets besides the
loop's outputs. The loop, checkpoints, topologies, memory plan, preflight, predict and Slurm never ask which task
runs: they ask the task.

The line is drawn as torchtitan's specs and Lightning's `LightningModule` draw it, not as TRL's per-method
trainers (one trainer class per method, each owning its loop): here one loop serves every task, and a task is
what a newcomer implements. Two phases, so that no method depends on another having run first:
- what the recipe alone decides is declared on the class (`model_class`, `columns`, `describe`, `planned_config`,
  `memory_rows`, `output_files`): the plan and preflight read it with no data and no tokenizer;
- `prepare` reads the data once and *returns* the task built with what the data taught it (label names, class
  weights...), the tokenized splits and notes for the plan. Every method of that instance is then a function of
  its arguments and of what it was built with; nothing writes into a task after it is built.
`PredictingTask` is the second, smaller interface that `launcher.predict` serves models through.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

import datasets
import torch
from accelerate import Accelerator
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from launcher.data.labels import LabelEncoder, LabelSpace
from launcher.data.sources import Splits
from launcher.recipe.schema import Recipe

Batch = dict[str, torch.Tensor]
Collator = Callable[[list[dict[str, Any]]], Batch]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's outcome."""

    metrics: dict[str, Any]
    """What is logged and compared: `loss`, the recipe's metrics, `examples` (classifiers add their per-class
    report, JSON-ready)."""
    scored: Any = None
    """What the task's `report` draws from besides the metrics (a regression's predictions against references)."""


@dataclass(frozen=True)
class Prepared:
    """What `Task.prepare` returns."""

    task: "Task"
    """The task, built with what the data taught it."""
    data: Splits
    """The tokenized splits (`input_ids` and the task's training targets)."""
    notes: list[str] = field(default_factory=list)
    """Lines for the run plan about what preparation found (dropped or shortened rows, label words, weights)."""


class Task(ABC):
    """One kind of fine-tuning: declared on the class from the recipe, built by `prepare` from the data."""

    model_class: Any
    """The transformers auto class the model is loaded with."""
    peft_task_type: TaskType
    """What peft is told the model does (which modules it keeps trainable besides the adapters)."""
    output_files: tuple[str, ...] = ()
    """What the task writes into the run directory besides the loop's outputs (plots, generations)."""
    sequences_per_example: int = 1
    """Token sequences the model runs per example (a preference pair: its two answers), for the memory plan's
    activations."""

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase):
        self.recipe = recipe
        self.tokenizer = tokenizer

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
    def memory_rows(cls, recipe: Recipe, vocab_size: int, parameters: int) -> dict[str, float]:
        """Per-device bytes the task adds to the memory plan's rows (named), besides weights, states, activations;
        `parameters` counts the model's weights."""
        return {}

    @classmethod
    @abstractmethod
    def prepare(cls, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> Prepared:
        """Raw rows in; the task built with what they taught it, the tokenized rows and the plan's notes out."""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments (label names for a classifier)."""
        return {}

    def adapt_model(self, model: torch.nn.Module) -> None:
        """Let the loaded (and LoRA-wrapped) model take this task's batches; by default it takes them as they are."""

    def class_ids(self, train: datasets.Dataset) -> Optional[np.ndarray]:
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
    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> Evaluation:
        """Loss and metrics over the whole eval set, identical on every rank (gathered exactly)."""

    def report(self, evaluation: Evaluation, model: torch.nn.Module, accelerator: Accelerator, step: int,
               run_dir: Path) -> None:
        """What an evaluation leaves besides its metrics (tables in the log, plots, generated samples), after
        optimizer step `step`; every rank calls it."""


class PredictingTask(Task):
    """A task whose models `launcher.predict` serves: one row of logits per example, scored without the loop.

    Predict builds it from a trained model's label names (its config, or the run's data for an adapter or a
    checkpoint) instead of from `prepare`."""

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, labels: LabelSpace,
                 class_weights: Optional[torch.Tensor] = None):
        super().__init__(recipe, tokenizer)
        self.labels = labels
        """The outputs in id order (class names; regression's one predicted quantity)."""
        self.class_weights = class_weights
        """`training.class_weights` as the loss applies them, or None."""

    @classmethod
    @abstractmethod
    def resolve_labels(cls, recipe: Recipe, splits: Splits) -> LabelSpace:
        """The outputs in id order, from the recipe and the data."""

    @classmethod
    @abstractmethod
    def label_encoder(cls, recipe: Recipe, labels: LabelSpace) -> LabelEncoder:
        """Raw label cells to training targets (`launcher.data.labels.LabelEncoder`)."""

    @classmethod
    def loss_weights(cls, recipe: Recipe, labels: LabelSpace, targets: np.ndarray) -> Optional[torch.Tensor]:
        """`training.class_weights` worked out from the training targets; None when the loss is unweighted."""
        return None

    @abstractmethod
    def check_input(self, dataset: datasets.Dataset, origin: str, evaluate: bool) -> None:
        """Predict's input rows hold what `logits` reads (to `evaluate`, the targets too), as training checks its
        rows, or a DataError names the column and rows."""

    @abstractmethod
    def logits(self, model: torch.nn.Module, dataset: datasets.Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
        """Every row's logits (fp32, on the CPU), in input order; the rows are tokenized as in training."""

    @abstractmethod
    def prediction_columns(self, logits: torch.Tensor) -> dict[str, list]:
        """Predict's output columns for a batch of logits."""

    @abstractmethod
    def score_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> Evaluation:
        """Loss and metrics of every example's logits against its targets (as `evaluate` scores the eval set)."""

    def summary(self, evaluation: Evaluation) -> str:
        """The evaluation as text for a terminal (a per-class table), or nothing."""
        return ""
