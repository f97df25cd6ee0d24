"""Offline metrics give `evaluate`'s numbers. The metric scripts of `evaluate` (accuracy, f1, precision,
recall, glue/mrpc) live on the hub, so they are checked here against hand-computed values and against
their definitions (GLUE MRPC: accuracy = mean(pred == label), f1 = binary F1 of class 1)."""

import numpy as np
import pytest

from launcher.tasks.metrics import METRICS, compute_metrics, per_class_report, per_class_table, predicted_class_counts, write_confusion_png

REFS = np.array([0, 1, 1, 0, 1, 1, 0, 0])
PREDS = np.array([0, 1, 0, 0, 1, 1, 1, 0])
# tp=3 (idx 1,4,5), fp=1 (idx 6), fn=1 (idx 2), tn=3 (idx 0,3,7)


def test_binary_metrics_by_hand():
    got = compute_metrics(["accuracy", "f1", "precision", "recall"], PREDS, REFS)
    assert got == pytest.approx({"accuracy": 6 / 8, "f1": 2 * 3 / (2 * 3 + 1 + 1), "precision": 3 / 4, "recall": 3 / 4})


def test_macro_metrics_by_hand_on_three_classes():
    refs = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> p .5 r .5 f1 .5 ; class 1: tp2 fp1 fn0 -> p 2/3 r 1 f1 .8 ; class 2: tp1 fp0 fn1 -> p 1 r .5 f1 2/3
    got = compute_metrics(["accuracy", "f1_macro", "precision_macro", "recall_macro"], preds, refs)
    assert got == pytest.approx({
        "accuracy": 4 / 6,
        "f1_macro": (0.5 + 0.8 + 2 / 3) / 3,
        "precision_macro": (0.5 + 2 / 3 + 1) / 3,
        "recall_macro": (0.5 + 1 + 0.5) / 3,
    })


def test_glue_mrpc_definition():
    """evaluate's glue/mrpc: {"accuracy": (preds == labels).mean(), "f1": f1_score(labels, preds)}."""
    rng = np.random.default_rng(0)
    refs, preds = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    got = compute_metrics(["accuracy", "f1"], preds, refs)
    tp = int(((preds == 1) & (refs == 1)).sum())
    fp = int(((preds == 1) & (refs == 0)).sum())
    fn = int(((preds == 0) & (refs == 1)).sum())
    assert got["accuracy"] == pytest.approx(float((preds == refs).mean()))
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_degenerate_cases_match_evaluate_defaults():
    """No positive predictions: precision is 0 (evaluate passes zero_division='warn', which yields 0)."""
    got = compute_metrics(["precision", "recall", "f1"], np.zeros(4, int), np.array([0, 1, 0, 1]))
    assert got == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_every_schema_metric_is_implemented():
    from typing import get_args

    from launcher.recipe.schema import MetricName

    assert set(get_args(MetricName)) == set(METRICS)


THREE_CLASS_REFS = np.array([0, 0, 1, 1, 2, 2])
THREE_CLASS_PREDS = np.array([0, 1, 1, 1, 2, 0])


def test_per_class_report_by_hand():
    """The same three classes as the macro test above, class by class; rows of the confusion matrix are true classes."""
    report = per_class_report(THREE_CLASS_PREDS, THREE_CLASS_REFS, ["neg", "neutral", "pos"])
    expected = {
        "neg": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "neutral": {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2},
        "pos": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2},
    }
    assert list(report["per_class"]) == list(expected)
    assert all(report["per_class"][name] == pytest.approx(row) for name, row in expected.items())
    assert report["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report["predicted"] == {"neg": 2, "neutral": 3, "pos": 1}
    macro = compute_metrics(["f1_macro"], THREE_CLASS_PREDS, THREE_CLASS_REFS)["f1_macro"]
    assert macro == pytest.approx(np.mean([row["f1"] for row in report["per_class"].values()]))


def test_classes_absent_from_the_eval_set_are_listed_with_zeros():
    report = per_class_report(np.array([0, 0, 1]), np.array([0, 1, 1]), ["a", "b", "c"])
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["confusion"][2] == [0, 0, 0] and report["predicted"] == {"a": 2, "b": 1, "c": 0}
    assert predicted_class_counts(np.array([2, 2]), ["a", "b", "c"]) == {"a": 0, "b": 0, "c": 2}


def test_per_class_table_shows_counts_confusion_and_a_collapse():
    table = per_class_table(per_class_report(THREE_CLASS_PREDS, THREE_CLASS_REFS, ["neg", "neutral", "pos"]))
    assert table.splitlines() == [
        "class            precision    recall        f1   support predicted",
        "neg                  0.500     0.500     0.500         2         2",
        "neutral              0.667     1.000     0.800         2         3",
        "pos                  1.000     0.500     0.667         2         1",
        "true \\ predicted       neg   neutral       pos",
        "neg                      1         1         0",
        "neutral                  0         2         0",
        "pos                      1         0         1",
    ]
    collapsed = per_class_table(per_class_report(np.zeros(6, int), np.array([0, 0, 1, 1, 0, 1]), ["negative", "positive"]))
    assert collapsed.splitlines()[-1] == "warning: all 6 predictions are 'negative': the model predicts one class only"


def test_confusion_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = write_confusion_png([[3, 1], [0, 4]], ["negative", "positive"], tmp_path / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
