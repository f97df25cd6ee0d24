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
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PretrainedConfig, PreTrainedTokenizerBase

from launcher.data.loaders import column_values
from launcher.data.labels import LabelEncoder, LabelSpace, check_labels_present, class_id_encoder, labelled_text_columns, resolve_labels
from launcher.data.sources import DataError, Splits, check_dataset_columns
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Batch, Collator, Evaluation, PredictingTask, Prepared
from launcher.tasks.metrics import compute_metrics, per_class_report, per_class_table, write_confusion_png
from launcher.tasks.sequence_classification.batches import PackedCollator, build_collator
from launcher.tasks.sequence_classification.packing import enable_packed_batches
from launcher.tasks.sequence_classification.tokenization import check_texts, tokenize_splits, tokenize_texts


CONFUSION_PNG = "confusion.png"


def texts_of(recipe: Recipe) -> str:
    return "sentence pairs" if recipe.data.is_pair_task else "single text"


def model_inputs(batch: Batch) -> Batch:
    """The batch without its labels: the task computes the loss from the logits itself."""
    return {name: value for name, value in batch.items() if name != "labels"}


@torch.no_grad()
def scores_of(model: torch.nn.Module, rows: list[dict[str, list[int]]], tokenizer: PreTrainedTokenizerBase,
              batch_size: int, device: torch.device) -> torch.Tensor:
    """The classifier's logits (fp32, on the CPU) of every tokenized row (`input_ids`, and `token_type_ids` where a
    pair has them), in input order: batches run longest first, each padded to its longest row."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    logits: list[Optional[torch.Tensor]] = [None] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc="predicting", unit="batch"):
        chosen = order[start:start + batch_size]
        batch = {name: tensor.to(device) for name, tensor in collate([rows[i] for i in chosen]).items()}
        for index, row_logits in zip(chosen, model(**model_inputs(batch)).logits.float().cpu()):
            logits[index] = row_logits
    return torch.stack(logits)


class SequenceClassification(PredictingTask):
    model_class = AutoModelForSequenceClassification
    peft_task_type = TaskType.SEQ_CLS  # peft keeps the new head (`classifier` / `score`) trainable and saves it
    problem_type = "single_label"
    hf_problem_type = "single_label_classification"
    """`config.problem_type` of the exported model, so transformers' own loss and pipelines treat it alike."""
    weights_meaning = "class weights"
    """What `training.class_weights` weigh, for the plan."""
    output_files = (CONFUSION_PNG,)

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

    @classmethod
    def prepare(cls, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> Prepared:
        labels = cls.resolve_labels(recipe, splits)
        tokenized = tokenize_splits(splits, recipe.data, tokenizer, cls.label_encoder(recipe, labels))
        weights = cls.loss_weights(recipe, labels, column_values(tokenized.train, "labels"))
        notes = [] if weights is None else [cls.weights_note(recipe, labels, weights)]
        return Prepared(cls(recipe, tokenizer, labels, weights), tokenized, notes)

    @classmethod
    def resolve_labels(cls, recipe: Recipe, splits: Splits) -> LabelSpace:
        return resolve_labels(splits, recipe.data, recipe.task.num_labels)

    @classmethod
    def label_encoder(cls, recipe: Recipe, labels: LabelSpace) -> LabelEncoder:
        return class_id_encoder(recipe.data, labels)

    @classmethod
    def loss_weights(cls, recipe: Recipe, labels: LabelSpace, targets: np.ndarray) -> Optional[torch.Tensor]:
        """`training.class_weights`: `balanced` from the training targets' class counts, or the recipe's list."""
        wanted = recipe.training.class_weights
        if wanted is None:
            return None
        weights = cls.balanced_weights(labels, np.asarray(targets)) if wanted == "balanced" else wanted
        return torch.tensor(weights, dtype=torch.float32)

    @classmethod
    def weights_note(cls, recipe: Recipe, labels: LabelSpace, weights: torch.Tensor) -> str:
        listed = ", ".join(f"{name} {weight:.3g}" for name, weight in zip(labels.names, weights.tolist()))
        origin = "balanced" if recipe.training.class_weights == "balanced" else "recipe"
        return f"{cls.weights_meaning} ({origin}): {listed}"

    @classmethod
    def balanced_weights(cls, labels: LabelSpace, targets: np.ndarray) -> list[float]:
        """scikit-learn's `balanced`: examples / (classes x examples of the class)."""
        counts = np.bincount(targets, minlength=len(labels.names))
        empty = [name for name, count in zip(labels.names, counts) if not count]
        if empty:
            raise DataError(f"training.class_weights=balanced: class(es) {empty} have no training examples")
        return (counts.sum() / (len(counts) * counts)).tolist()

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels.names), "id2label": self.labels.id2label, "label2id": self.labels.label2id,
                "problem_type": self.hf_problem_type}

    def adapt_model(self, model: torch.nn.Module) -> None:
        if self.recipe.data.padding == "packed":
            enable_packed_batches(model)

    def class_ids(self, train: datasets.Dataset) -> Optional[np.ndarray]:
        return column_values(train, "labels")

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

    def check_input(self, dataset: datasets.Dataset, origin: str, evaluate: bool) -> None:
        data = self.recipe.data
        texts = [data.text_field] + ([data.text_pair_field] if data.text_pair_field else [])
        check_dataset_columns(dataset, origin, self.columns(self.recipe) if evaluate else texts)
        check_texts(dataset.to_dict(), texts, list(range(len(dataset))), origin)
        if evaluate and not data.label_columns:
            check_labels_present(dataset, origin, data.label_field)

    def logits(self, model: torch.nn.Module, dataset: datasets.Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
        encoded = tokenize_texts(dataset.to_dict(), self.recipe.data, self.tokenizer, padding=False)
        rows = [dict(zip(encoded.keys(), values)) for values in zip(*encoded.values())]
        return scores_of(model, rows, self.tokenizer, batch_size, device)

    def prediction_columns(self, logits: torch.Tensor) -> dict[str, list]:
        """The predicted class's name and id and every class's probability."""
        ids = self.predictions(logits).tolist()
        return {"predicted_label": [self.labels.names[i] for i in ids], "predicted_id": ids,
                **self.probability_columns(logits)}

    def probability_columns(self, logits: torch.Tensor) -> dict[str, list]:
        probabilities = self.probabilities(logits).cpu()
        return {f"probability_{name}": probabilities[:, i].tolist() for i, name in enumerate(self.labels.names)}

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> Evaluation:
        logits, targets = [], []
        for batch in loader:
            gathered = accelerator.gather_for_metrics((model(**model_inputs(batch)).logits, batch["labels"]))
            logits.append(gathered[0].float().cpu())
            targets.append(gathered[1].cpu())
        return self.score_logits(torch.cat(logits), torch.cat(targets))

    def score_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> Evaluation:
        predictions, references = self.predictions(logits).numpy(), targets.numpy()
        metrics = {"loss": float(self.example_losses(logits, targets).mean()), **self.score(predictions, references),
                   "examples": len(references)}
        return Evaluation(metrics, (predictions, references))

    def score(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, Any]:
        """The recipe's metrics and the per-class report."""
        return {**compute_metrics(self.recipe.metric_names, predictions, references),
                **per_class_report(predictions, references, self.labels.names)}

    def summary(self, evaluation: Evaluation) -> str:
        """The per-class table (a collapse to one class is named)."""
        return per_class_table(evaluation.metrics)

    def report(self, evaluation: Evaluation, model: torch.nn.Module, accelerator: Accelerator, step: int,
               run_dir: Path) -> None:
        """The per-class table in the log and the confusion matrix as a PNG."""
        if accelerator.is_main_process:
            accelerator.print(self.summary(evaluation), end="")
            if "confusion" in evaluation.metrics:
                write_confusion_png(evaluation.metrics["confusion"], self.labels.names, run_dir / CONFUSION_PNG)
