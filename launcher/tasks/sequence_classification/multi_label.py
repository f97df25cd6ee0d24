"""`problem_type: multi_label`: any number of classes per example. One sigmoid per class and binary cross-entropy
(averaged over the classes, then over examples, as transformers' own multi-label loss; `training.class_weights`
weigh each class's positive examples, BCE's `pos_weight`); a class is predicted when its probability reaches
`task.threshold`. Labels are a list of names or ids per row, or one 0/1 column per class
(`data.label_columns`). Metrics: exact match and micro / macro precision, recall, F1."""

from __future__ import annotations

from typing import Any, Optional

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from launcher.data.labels import LabelEncoder, LabelSpace, class_id, resolve_labels
from launcher.data.sources import DataError, Splits
from launcher.recipe.schema import Recipe
from launcher.tasks.sequence_classification.single_label import SequenceClassification, texts_of

TRUE_OR_FALSE = {0, 1, True, False}


class MultiLabelClassification(SequenceClassification):
    problem_type = "multi_label"
    hf_problem_type = "multi_label_classification"
    weights_meaning = "positive-example weights (BCE pos_weight)"

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        return f"multi-label {texts_of(recipe)}, {recipe.task.num_labels} classes, threshold {recipe.task.threshold:g}"

    @classmethod
    def resolve_labels(cls, recipe: Recipe, splits: Splits) -> LabelSpace:
        columns = recipe.data.label_columns
        if columns:
            return LabelSpace(list(columns))
        return resolve_labels(splits, recipe.data, recipe.task.num_labels, per_row_lists=True)

    @classmethod
    def label_encoder(cls, recipe: Recipe, labels: LabelSpace) -> LabelEncoder:
        """Each row's classes as a multi-hot float vector (BCE's targets)."""
        columns, field, count = recipe.data.label_columns, recipe.data.label_field, len(labels.names)

        def from_columns(batch: dict, indices: list[int], origin: str) -> list[list[float]]:
            for column in columns:
                bad = [row for row, value in zip(indices, batch[column]) if value not in TRUE_OR_FALSE]
                if bad:
                    raise DataError(f"{origin}: column {column!r} must hold 0 or 1 (data.label_columns) in row(s) {bad[:10]}")
            return [[float(value) for value in row] for row in zip(*(batch[column] for column in columns))]

        def from_lists(batch: dict, indices: list[int], origin: str) -> list[list[float]]:
            encoded = []
            for row, row_labels in zip(indices, batch[field]):
                ids = [class_id(label, labels) for label in row_labels or []]
                if None in ids:
                    raise DataError(f"{origin}: column {field!r} row {row} holds {row_labels!r}: ids must be in [0, {count})")
                encoded.append([float(i in ids) for i in range(count)])
            return encoded

        return from_columns if columns else from_lists

    @classmethod
    def balanced_weights(cls, labels: LabelSpace, targets: np.ndarray) -> list[float]:
        """Per class, its negative examples / its positive ones (the usual `pos_weight`): a class on in 2% of the
        examples weighs its positives 49x, so that predicting it never stops being the cheap way out."""
        on = targets.sum(axis=0)
        off = len(targets) - on
        degenerate = [name for name, positives, negatives in zip(labels.names, on, off) if not positives or not negatives]
        if degenerate:
            raise DataError(f"training.class_weights=balanced: class(es) {degenerate} are on in no or in every training example")
        return (off / on).tolist()

    def class_ids(self, train: datasets.Dataset) -> Optional[np.ndarray]:
        return None  # an example has no single class to keep the batches' mix of

    def example_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos_weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight,
                                                  reduction="none").mean(dim=-1)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return (self.probabilities(logits) >= self.recipe.task.threshold).long()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def prediction_columns(self, logits: torch.Tensor) -> dict[str, list]:
        chosen = self.predictions(logits).cpu()
        return {"predicted_labels": [[name for name, on in zip(self.labels.names, row) if on] for row in chosen.tolist()],
                **self.probability_columns(logits)}

    def score(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, Any]:
        return super().score(predictions, references.astype(int))  # BCE's float targets as 0/1 for scikit-learn
