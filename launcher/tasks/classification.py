"""`task.type: sequence_classification`: a classification head on an encoder (`classifier`) or a decoder (`score`
on the last token), cross-entropy over examples, accuracy / F1 metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from launcher.data import (
    LabelSpace,
    PackedCollator,
    Splits,
    build_collator,
    labelled_text_columns,
    resolve_labels,
    tokenize_splits,
)
from launcher.metrics import compute_metrics, per_class_report, per_class_table, write_confusion_png
from launcher.packing import enable_packed_batches
from launcher.recipe import Recipe
from launcher.tasks.base import Batch, Collator, Task


CONFUSION_PNG = "confusion.png"


class SequenceClassification(Task):
    model_class = AutoModelForSequenceClassification
    peft_task_type = TaskType.SEQ_CLS  # peft keeps the new head (`classifier` / `score`) trainable and saves it

    labels: LabelSpace

    @classmethod
    def columns(cls, recipe: Recipe) -> list[str]:
        return labelled_text_columns(recipe.data)

    def prepare_data(self, splits: Splits) -> Splits:
        self.labels = resolve_labels(splits, self.recipe.data, self.recipe.task.num_labels)
        return tokenize_splits(splits, self.recipe.data, self.labels, self.tokenizer)

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": self.recipe.task.num_labels, "id2label": self.labels.id2label,
                "label2id": self.labels.label2id}

    def adapt_model(self, model: torch.nn.Module) -> None:
        if self.recipe.data.padding == "packed":
            enable_packed_batches(model)

    def class_ids(self, train: datasets.Dataset) -> Optional[list[int]]:
        return list(train["labels"])

    def collators(self) -> tuple[Collator, Collator]:
        padded = build_collator(self.tokenizer, self.recipe)
        train = PackedCollator(self.tokenizer.pad_token_id) if self.recipe.data.padding == "packed" else padded
        return train, padded

    def loss_items(self, batch: Batch) -> int:
        return len(batch["labels"])

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        losses, predictions, references = [], [], []
        for batch in loader:
            logits = model(**batch).logits
            logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            losses.append(F.cross_entropy(logits.float(), labels, reduction="none").cpu())
            predictions.append(logits.argmax(dim=-1).cpu())
            references.append(labels.cpu())
        predictions, references = torch.cat(predictions).numpy(), torch.cat(references).numpy()
        metrics = compute_metrics(self.recipe.metric_names, predictions, references)
        self.report = per_class_report(predictions, references, self.labels.names)
        return {"loss": float(torch.cat(losses).mean()), **metrics, "examples": len(references),
                "per_class": self.report["classes"], "confusion": self.report["confusion"],
                "predicted": self.report["predicted"]}

    def after_evaluation(self, model: torch.nn.Module, accelerator: Accelerator, step: int, run_dir: Path) -> None:
        """The per-class table in the log (a collapse to one class is named) and the confusion matrix as a PNG."""
        if accelerator.is_main_process:
            accelerator.print(per_class_table(self.report), end="")
            write_confusion_png(self.report["confusion"], self.labels.names, run_dir / CONFUSION_PNG)
