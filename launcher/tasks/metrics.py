"""Evaluation metrics that work offline.

`evaluate.load("accuracy")` fetches its metric script from the hub. Its accuracy, f1, precision,
recall, glue/mrpc and glue/stsb metrics are thin wrappers over scikit-learn's and SciPy's functions with
these same arguments, so calling those directly gives the same numbers with no network.

Each metric takes (references, predictions): class ids (single_label), 0/1 matrices of examples x classes
(multi_label, where scikit-learn's accuracy is the exact-match ratio) or numbers (regression).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from launcher.train.curves import NO_MATPLOTLIB, new_figure

MetricFn = Callable[[np.ndarray, np.ndarray], float]

METRICS: dict[str, MetricFn] = {
    "accuracy": lambda refs, preds: accuracy_score(refs, preds),
    "exact_match": lambda refs, preds: accuracy_score(refs, preds),
    "f1": lambda refs, preds: f1_score(refs, preds, average="binary", pos_label=1, zero_division=0),
    "precision": lambda refs, preds: precision_score(refs, preds, average="binary", pos_label=1, zero_division=0),
    "recall": lambda refs, preds: recall_score(refs, preds, average="binary", pos_label=1, zero_division=0),
    **{f"{name}_{average}": partial(score, average=average, zero_division=0)
       for name, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score))
       for average in ("macro", "micro")},
    # A constant prediction has no correlation: SciPy warns and returns nan, which the log shows as it is.
    "pearson": lambda refs, preds: pearsonr(refs, preds).statistic,
    "spearman": lambda refs, preds: spearmanr(refs, preds).statistic,
    "mse": lambda refs, preds: mean_squared_error(refs, preds),
    "mae": lambda refs, preds: mean_absolute_error(refs, preds),
}


def compute_metrics(names: Sequence[str], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Each named metric of `predictions` against `references` (class ids)."""
    return {name: float(METRICS[name](references, predictions)) for name in names}


def predicted_class_counts(predictions: np.ndarray, label_names: Sequence[str]) -> dict[str, int]:
    """How many predictions went to each class, every class listed: a model that collapsed to one class shows it.
    `predictions` are class ids, or a 0/1 matrix of examples x classes (multi_label)."""
    counts = predictions.sum(axis=0) if predictions.ndim == 2 else np.bincount(predictions, minlength=len(label_names))
    return dict(zip(label_names, counts.tolist()))


def per_class_report(predictions: np.ndarray, references: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    """Per class (in id order) precision, recall, f1 and support (its examples), the predicted-class counts and,
    for class ids (single_label), the confusion matrix as nested lists (`confusion[true][predicted]`, scikit-learn's
    layout). JSON-ready."""
    ids = list(range(len(label_names)))
    scores = precision_recall_fscore_support(references, predictions, labels=ids, zero_division=0)
    report = {
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(label_names, *scores)
        },
        "predicted": predicted_class_counts(predictions, label_names),
    }
    if predictions.ndim == 1:
        report["confusion"] = confusion_matrix(references, predictions, labels=ids).tolist()
    return report


def collapse_note(predicted: dict[str, int]) -> Optional[str]:
    """A warning line when every prediction went to one class, else None."""
    used = [name for name, count in predicted.items() if count]
    if len(used) == 1 and len(predicted) > 1:
        return f"warning: all {predicted[used[0]]} predictions are {used[0]!r}: the model predicts one class only"
    return None


CONFUSION_CORNER = "true \\ predicted"


def per_class_table(report: dict[str, Any]) -> str:
    """The report as text for the log: one row per class with its predicted count, then the confusion matrix
    (single_label) or the classes never predicted (multi_label)."""
    names = list(report["per_class"])
    width = max(len(CONFUSION_CORNER), *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9} {'predicted':>9}"]
    for name, row in report["per_class"].items():
        lines.append(f"{name:<{width}} {row['precision']:>9.3f} {row['recall']:>9.3f} {row['f1']:>9.3f} "
                     f"{row['support']:>9d} {report['predicted'][name]:>9d}")
    if "confusion" not in report:
        never = [name for name, count in report["predicted"].items() if not count]
        return "\n".join(lines + ([f"never predicted: {', '.join(never)}"] if never else [])) + "\n"
    cell = max(9, *(len(n) for n in names))
    lines.append(f"{CONFUSION_CORNER:<{width}} " + " ".join(f"{n:>{cell}}" for n in names))
    lines += [f"{name:<{width}} " + " ".join(f"{count:>{cell}d}" for count in row) for name, row in zip(names, report["confusion"])]
    note = collapse_note(report["predicted"])
    return "\n".join(lines + ([note] if note else [])) + "\n"


def write_confusion_png(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str | Path) -> Optional[Path]:
    """The confusion matrix as a heat map with the count in every cell (rows: true class, columns: predicted);
    `path`, or None after a one-line note when matplotlib is missing."""
    side = 1.2 + 0.6 * len(names)
    figure = new_figure(figsize=(side + 1.5, side))
    if figure is None:
        print(f"note: {Path(path).name} not drawn: {NO_MATPLOTLIB}")
        return None
    counts = np.asarray(matrix)
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, column), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        axes.text(column, row, str(count), ha="center", va="center", color="white" if dark else "black", fontsize=9)
    figure.savefig(path, dpi=110)
    return Path(path)


def write_regression_png(predictions: np.ndarray, references: np.ndarray, name: str, path: str | Path) -> Optional[Path]:
    """Predicted against true values, one dot per eval example, with the diagonal a perfect model would sit on;
    `path`, or None after a one-line note when matplotlib is missing."""
    figure = new_figure(figsize=(4.8, 4.5))
    if figure is None:
        print(f"note: {Path(path).name} not drawn: {NO_MATPLOTLIB}")
        return None
    axes = figure.subplots()
    axes.scatter(references, predictions, s=8, alpha=0.5)
    low, high = float(min(references.min(), predictions.min())), float(max(references.max(), predictions.max()))
    axes.plot([low, high], [low, high], color="grey", linewidth=1)
    axes.set_xlabel(f"true {name}")
    axes.set_ylabel(f"predicted {name}")
    figure.savefig(path, dpi=110)
    return Path(path)
