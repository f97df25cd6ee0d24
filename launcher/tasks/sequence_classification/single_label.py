"""`task.type: sequence_classification` with `problem_type: single_label`: a classification head on an encoder
(`classifier`) or a decoder (`score` on the last token), cross-entropy over examples (optionally class-weighted),
accuracy / F1 metrics, the per-class report and confusion matrix.

It is also the base of the other problem types (`multi_label`, `regression`), which share the model, the
tokenization and the loop over the eval set, and differ in labels, loss, predictions and report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from launcher.data.labels import LabelEncoder, LabelSpace, class_id_encoder, labelled_text_columns, resolve_labels
from launcher.data.sources import DataError, Splits
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Batch, Collator, Task
from launcher.tasks.metrics import compute_metrics, per_class_report, per_class_table, write_confusion_png
from launcher.tasks.sequence_classification.batches import PackedCollator, build_collator
from launcher.tasks.sequence_classification.packing import enable_packed_batches
from launcher.tasks.sequence_classification.tokenization import tokenize_splits


CONFUSION_PNG = "confusion.png"


def texts_of(recipe: Recipe) -> str:
    return "sentence pairs" if recipe.data.is_pair_task else "single text"


def model_inputs(batch: Batch) -> Batch:
    """The batch without its labels: the task computes the loss from the logits itself."""
    return {name: value for name, value in batch.items() if name != "labels"}


class SequenceClassification(Task):
    model_class = AutoModelForSequenceClassification
    peft_task_type = TaskType.SEQ_CLS  # peft keeps the new head (`classifier` / `score`) trainable and saves it
    problem_type = "single_label"
    hf_problem_type = "single_label_classification"
    """`config.problem_type` of the exported model, so transformers' own loss and pipelines treat it alike."""

    labels: LabelSpace
    class_weights: Optional[torch.Tensor] = None
    weights_meaning = "class weights"
    """What `training.class_weights` weigh, for the plan."""

    output_files = (CONFUSION_PNG,)
    serves_predictions = True

    @classmethod
    def exported_task_section(cls, config: PretrainedConfig) -> dict[str, Any]:
        """The recipe's `task` section for an exported model read from its config alone."""
        return {"problem_type": cls.problem_type, "num_labels": config.num_labels}

    @classmethod
    def columns(cls, recipe: Recipe) -> list[str]:
        return labelled_text_columns(recipe.data)

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        return f"{recipe.task.num_labels}-class {texts_of(recipe)}"

    @classmethod
    def planned_config(cls, recipe: Recipe) -> dict[str, Any]:
        return {"num_labels": recipe.task.head_outputs}

    def prepare_data(self, splits: Splits) -> Splits:
        self.labels = self.resolve_labels(splits)
        tokenized = tokenize_splits(splits, self.recipe.data, self.tokenizer, self.label_encoder())
        self.set_class_weights(tokenized.train)
        return tokenized

    def resolve_labels(self, splits: Splits) -> LabelSpace:
        """The output names in id order (classes; the predicted quantity for regression)."""
        return resolve_labels(splits, self.recipe.data, self.recipe.task.num_labels)

    def label_encoder(self) -> LabelEncoder:
        return class_id_encoder(self.recipe.data, self.labels)

    def set_class_weights(self, train: datasets.Dataset) -> None:
        """`training.class_weights`: `balanced` from the training set's class counts, or the recipe's list."""
        wanted = self.recipe.training.class_weights
        if wanted is None:
            return
        weights = self.balanced_weights(train) if wanted == "balanced" else wanted
        self.class_weights = torch.tensor(weights, dtype=torch.float32)
        listed = ", ".join(f"{name} {weight:.3g}" for name, weight in zip(self.labels.names, weights))
        self.notes.append(f"{self.weights_meaning} ({'balanced' if wanted == 'balanced' else 'recipe'}): {listed}")

    def balanced_weights(self, train: datasets.Dataset) -> list[float]:
        """scikit-learn's `balanced`: examples / (classes x examples of the class)."""
        counts = np.bincount(train.with_format("numpy")["labels"], minlength=len(self.labels.names))
        empty = [name for name, count in zip(self.labels.names, counts) if not count]
        if empty:
            raise DataError(f"training.class_weights=balanced: class(es) {empty} have no training examples")
        return (counts.sum() / (len(counts) * counts)).tolist()

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels.names), "id2label": self.labels.id2label, "label2id": self.labels.label2id,
                "problem_type": self.hf_problem_type}

    def adapt_model(self, model: torch.nn.Module) -> None:
        if self.recipe.data.padding == "packed":
            enable_packed_batches(model)

    def class_ids(self, train: datasets.Dataset) -> Optional[list[int]]:
        return list(train["labels"])

    def collators(self) -> tuple[Collator, Collator]:
        padded = build_collator(self.tokenizer, self.recipe)
        train = PackedCollator(self.tokenizer.pad_token_id) if self.recipe.data.padding == "packed" else padded
        return train, padded

    def loss_items(self, batch: Batch, counted: torch.Tensor) -> int:
        return int(counted.sum())

    def loss(self, model: torch.nn.Module, batch: Batch, counted: torch.Tensor) -> torch.Tensor:
        losses = self.example_losses(model(**model_inputs(batch)).logits, batch["labels"])
        return losses[counted.to(losses.device)].sum()

    def example_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each example's loss: cross-entropy, times its class's weight when the recipe weights classes."""
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits.float(), labels, weight=weight, reduction="none")

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics score: class ids (`multi_label`: 0/1 per class, `regression`: the value)."""
        return logits.argmax(dim=-1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=-1)

    def prediction_columns(self, logits: torch.Tensor) -> dict[str, list]:
        """`launcher.predict`'s output columns for a batch: the predicted class's name and id and every class's
        probability."""
        ids = self.predictions(logits).tolist()
        return {"predicted_label": [self.labels.names[i] for i in ids], "predicted_id": ids,
                **self.probability_columns(logits)}

    def probability_columns(self, logits: torch.Tensor) -> dict[str, list]:
        probabilities = self.probabilities(logits).cpu()
        return {f"probability_{name}": probabilities[:, i].tolist() for i, name in enumerate(self.labels.names)}

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, Any]:
        losses, predictions, references = [], [], []
        for batch in loader:
            logits = model(**model_inputs(batch)).logits
            logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            losses.append(self.example_losses(logits, labels).cpu())
            predictions.append(self.predictions(logits).cpu())
            references.append(labels.cpu())
        predictions, references = torch.cat(predictions).numpy(), torch.cat(references).numpy()
        return {"loss": float(torch.cat(losses).mean()), **self.score(predictions, references), "examples": len(references)}

    def score(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, Any]:
        """The recipe's metrics and the per-class report (kept for `after_evaluation`)."""
        self.report = per_class_report(predictions, references, self.labels.names)
        return {**compute_metrics(self.recipe.metric_names, predictions, references), **self.report}

    def after_evaluation(self, model: torch.nn.Module, accelerator: Accelerator, step: int, run_dir: Path) -> None:
        """The per-class table in the log (a collapse to one class is named) and the confusion matrix as a PNG."""
        if accelerator.is_main_process:
            accelerator.print(per_class_table(self.report), end="")
            if "confusion" in self.report:
                write_confusion_png(self.report["confusion"], self.labels.names, run_dir / CONFUSION_PNG)
