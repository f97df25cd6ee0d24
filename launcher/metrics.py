"""Evaluation metrics that work offline.

`evaluate.load("accuracy")` fetches its metric script from the hub. Its accuracy, f1, precision,
recall and glue/mrpc metrics are thin wrappers over scikit-learn's functions with these same
arguments, so calling scikit-learn directly gives the same numbers with no network.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

MetricFn = Callable[[np.ndarray, np.ndarray], float]

METRICS: dict[str, MetricFn] = {
    "accuracy": lambda refs, preds: accuracy_score(refs, preds),
    "f1": lambda refs, preds: f1_score(refs, preds, average="binary", pos_label=1),
    "f1_macro": lambda refs, preds: f1_score(refs, preds, average="macro"),
    "precision": lambda refs, preds: precision_score(refs, preds, average="binary", pos_label=1, zero_division=0),
    "recall": lambda refs, preds: recall_score(refs, preds, average="binary", pos_label=1, zero_division=0),
    "precision_macro": lambda refs, preds: precision_score(refs, preds, average="macro", zero_division=0),
    "recall_macro": lambda refs, preds: recall_score(refs, preds, average="macro", zero_division=0),
}


def compute_metrics(names: Sequence[str], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Each named metric of `predictions` against `references` (class ids)."""
    return {name: float(METRICS[name](references, predictions)) for name in names}
