"""The problem types behind the classification seam: multi-label (lists or 0/1 columns, sigmoid + BCE, threshold,
micro / macro F1, exact match), regression (one output, MSE, Pearson / Spearman) and class-weighted single-label
cross-entropy, each trained end to end through the real entry point on tiny models; plus their recipe and data
errors."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from builders import FILLER, NEGATIVE, POSITIVE, TOPICS, rating_rows, topic_rows, write_csv, write_jsonl
from recipes import tiny_recipe, write_recipe
from runs import REPO, eval_loss_of, run_in_process
from launcher.data.sources import DataError
from launcher.recipe.loading import RecipeError, load_recipe
from launcher.tasks import prepare_task
from launcher.tasks.metrics import METRICS
from launcher.tasks.sequence_classification.multi_label import MultiLabelClassification
from launcher.tasks.sequence_classification.regression import Regression
from launcher.train.reporting import read_metrics_log
from launcher.train.run_directory import read_run_summary

TOPIC_NAMES = sorted(TOPICS)


@pytest.fixture(scope="module")
def topic_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("topics")
    train, evaluation = topic_rows(256, seed=10), topic_rows(48, seed=11)
    return {"train_jsonl": write_jsonl(root / "train.jsonl", train), "eval_jsonl": write_jsonl(root / "eval.jsonl", evaluation),
            "train_csv": write_csv(root / "train.csv", [{k: v for k, v in r.items() if k != "topics"} for r in train]),
            "eval_csv": write_csv(root / "eval.csv", [{k: v for k, v in r.items() if k != "topics"} for r in evaluation])}


def multi_label_recipe(assets, topic_files, out: Path, columns: bool = False, **sections) -> dict:
    source = "csv" if columns else "jsonl"
    data = {"train_file": str(topic_files[f"train_{source}"]), "eval_file": str(topic_files[f"eval_{source}"]),
            **({"label_columns": TOPIC_NAMES} if columns else {"label_field": "topics"})}
    return tiny_recipe(assets, out, data=data, task={"problem_type": "multi_label", "num_labels": 3},
                       evaluation={"metrics": ["f1_micro", "f1_macro", "exact_match"]}, **sections)


def prepared(assets, tmp_path: Path, raw: dict):
    """The recipe's task with its data prepared as a run prepares it (`launcher.tasks.base.Prepared`)."""
    recipe = load_recipe(write_recipe(tmp_path / "prepared.yaml", raw))
    return prepare_task(recipe, AutoTokenizer.from_pretrained(assets["bert"]))


def train(tmp_path: Path, name: str, recipe: dict, *overrides: str) -> Path:
    assert run_in_process(write_recipe(tmp_path / f"{name}.yaml", recipe), *overrides) == 0
    return Path(recipe["output"]["dir"])


def test_multi_label_trains_learns_and_exports_a_multi_label_model(tmp_path, assets, topic_files, capsys):
    out = train(tmp_path, "multi", multi_label_recipe(assets, topic_files, tmp_path / "multi",
                                                      model="bert_no_dropout", training={"epochs": 15, "lr": 1e-3, "per_device_batch_size": 16}))
    evals = [r for r in read_metrics_log(out) if r["kind"] == "eval"]
    final = read_run_summary(out)["final_eval"]
    assert {"f1_micro", "f1_macro", "exact_match", "per_class", "predicted"} <= set(final) and "confusion" not in final
    assert set(final["per_class"]) == set(TOPIC_NAMES)
    assert [final["per_class"][t]["support"] for t in TOPIC_NAMES] == [
        sum(t in r["topics"] for r in topic_rows(48, seed=11)) for t in TOPIC_NAMES]
    assert final["f1_micro"] >= 0.7 and final["loss"] < evals[0]["loss"]
    assert "precision" in capsys.readouterr().out  # the per-class table is in the log
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.problem_type == "multi_label_classification"
    assert list(model.config.id2label.values()) == TOPIC_NAMES
    # transformers' own multi-label loss on the reloaded model is the run's eval loss (mean BCE over classes).
    assert eval_loss_of(model, out) == pytest.approx(final["loss"], abs=1e-5)


def test_multi_label_from_lists_and_from_columns_is_the_same_run(tmp_path, assets, topic_files):
    lists = train(tmp_path, "lists", multi_label_recipe(assets, topic_files, tmp_path / "lists", training={"epochs": 1}))
    columns = train(tmp_path, "columns", multi_label_recipe(assets, topic_files, tmp_path / "columns", columns=True,
                                                            training={"epochs": 1}))
    losses = [[r["loss"] for r in read_metrics_log(run) if r["kind"] == "train"] for run in (lists, columns)]
    assert losses[0] == losses[1]


def test_multi_label_threshold_decides_the_predicted_classes(assets, tmp_path, topic_files):
    raw = multi_label_recipe(assets, topic_files, tmp_path / "t")
    raw["task"]["threshold"] = 0.7
    task = prepared(assets, tmp_path, raw).task
    assert isinstance(task, MultiLabelClassification)
    logits = torch.tensor([[0.0, 1.0, 0.9], [-3.0, 3.0, 0.8]])  # sigmoid: .5 .73 .71 / .05 .95 .69
    assert task.predictions(logits).tolist() == [[0, 1, 1], [0, 1, 0]]
    columns = task.prediction_columns(logits)
    assert columns["predicted_labels"] == [TOPIC_NAMES[1:], [TOPIC_NAMES[1]]]
    assert columns[f"probability_{TOPIC_NAMES[1]}"] == pytest.approx([0.7311, 0.9526], abs=1e-4)


def test_multi_label_balanced_weights_weigh_each_class_positives(assets, tmp_path, topic_files, capsys):
    raw = multi_label_recipe(assets, topic_files, tmp_path / "pw", training={"class_weights": "balanced", "epochs": 1})
    result = prepared(assets, tmp_path, raw)
    task, train = result.task, result.data.train
    on = np.asarray(train["labels"]).sum(axis=0)
    assert task.class_weights.tolist() == pytest.approx(((len(train) - on) / on).tolist())
    logits, labels = torch.randn(4, 3), torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]])
    expected = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=task.class_weights, reduction="none").mean(-1)
    assert task.example_losses(logits, labels) == pytest.approx(expected)
    assert run_in_process(write_recipe(tmp_path / "pw.yaml", raw)) == 0
    assert "positive-example weights (BCE pos_weight) (balanced): blame" in capsys.readouterr().out


def test_multi_label_metrics_are_scikit_learns():
    refs = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    preds = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]])
    # 4 true positives, 1 false positive, 1 false negative: micro F1 = 8 / 10.
    assert METRICS["f1_micro"](refs, preds) == pytest.approx(0.8)
    assert METRICS["exact_match"](refs, preds) == pytest.approx(1 / 3)
    assert METRICS["f1_macro"](refs, preds) == pytest.approx(np.mean([1.0, 1.0, 0.0]))


@pytest.fixture(scope="module")
def rating_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ratings")
    return {"train": write_csv(root / "train.csv", rating_rows(96, seed=20)),
            "eval": write_csv(root / "eval.csv", rating_rows(48, seed=21))}


def regression_recipe(assets, rating_files, out: Path, **sections) -> dict:
    data = {"train_file": str(rating_files["train"]), "eval_file": str(rating_files["eval"]), "label_field": "score"}
    return tiny_recipe(assets, out, data=data, task={"problem_type": "regression", "num_labels": None},
                       evaluation={"metrics": ["pearson", "spearman", "mse"]}, **sections)


def test_regression_trains_learns_and_exports_a_regression_model(tmp_path, assets, rating_files):
    out = train(tmp_path, "sts", regression_recipe(assets, rating_files, tmp_path / "sts", model="bert_no_dropout",
                                                   training={"epochs": 10, "lr": 3e-3}))
    evals = [r for r in read_metrics_log(out) if r["kind"] == "eval"]
    final = read_run_summary(out)["final_eval"]
    assert set(final) == {"loss", "pearson", "spearman", "mse", "examples"}
    assert final["mse"] == pytest.approx(final["loss"], rel=1e-5)  # the eval loss is the MSE
    assert final["pearson"] >= 0.8 and final["spearman"] >= 0.7 and final["mse"] < evals[0]["mse"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    assert (out / "regression.png").is_file() and not (out / "confusion.png").exists()
    assert eval_loss_of(model, out) == pytest.approx(final["loss"], rel=1e-5)


def test_regression_prediction_column_is_named_after_the_label(assets, tmp_path, rating_files):
    task = prepared(assets, tmp_path, regression_recipe(assets, rating_files, tmp_path / "r")).task
    assert isinstance(task, Regression)
    assert task.prediction_columns(torch.tensor([[1.5], [4.25]])) == {"predicted_score": [1.5, 4.25]}


@pytest.fixture(scope="module")
def imbalanced_files(tmp_path_factory) -> dict[str, Path]:
    """Three classes, the middle one rare (1 in 8) and close to another: negative (0: bad, awful, dull, boring),
    harsh (1: weak, poor, messy, flat) and positive (2)."""
    root = tmp_path_factory.mktemp("imbalanced")

    def rows(n: int, seed: int) -> list[dict]:
        rng, out = random.Random(seed), []
        for i in range(n):
            label = 1 if i % 8 == 0 else rng.choice([0, 2])
            words = {0: NEGATIVE[:4], 1: NEGATIVE[4:], 2: POSITIVE}[label]
            text = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))] + [rng.choice(words)]
            rng.shuffle(text)
            out.append({"text": " ".join(text), "label": label})
        return out

    return {"train": write_csv(root / "train.csv", rows(192, 30)), "eval": write_csv(root / "eval.csv", rows(48, 31))}


def weighted_recipe(assets, files, out: Path, weights, **sections) -> dict:
    return tiny_recipe(assets, out, model="bert_no_dropout",
                       data={"train_file": str(files["train"]), "eval_file": str(files["eval"])},
                       task={"num_labels": 3}, evaluation={"metrics": ["accuracy", "f1_macro"]},
                       training={"class_weights": weights, **sections.pop("training", {})}, **sections)


def test_balanced_class_weights_follow_scikit_learn_and_weigh_each_example(assets, tmp_path, imbalanced_files):
    result = prepared(assets, tmp_path, weighted_recipe(assets, imbalanced_files, tmp_path / "w", "balanced"))
    task, train = result.task, result.data.train
    counts = np.bincount(train["labels"], minlength=3)
    assert counts[1] == 24
    expected = len(train) / (3 * counts)  # sklearn.utils.class_weight.compute_class_weight("balanced", ...)
    assert task.class_weights.tolist() == pytest.approx(expected.tolist())
    assert any("class weights (balanced): LABEL_0" in note for note in result.notes)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    unweighted = F.cross_entropy(logits, labels, reduction="none")
    assert task.example_losses(logits, labels) == pytest.approx(unweighted * torch.tensor(expected, dtype=torch.float32)[labels])


def test_class_weights_split_into_micro_batches_give_the_same_step(tmp_path, assets, imbalanced_files):
    """The mean of weighted example losses, not torch's weighted mean (divided by the batch's weights), so
    accumulation does not change the step."""
    runs = [train(tmp_path, name, weighted_recipe(assets, imbalanced_files, tmp_path / name, [1.0, 4.0, 1.0],
                                                  training={"epochs": 1, "per_device_batch_size": batch,
                                                            "gradient_accumulation_steps": accumulation}))
            for name, batch, accumulation in (("b8", 8, 1), ("b2x4", 2, 4))]
    losses = [[r["loss"] for r in read_metrics_log(run) if r["kind"] == "train"] for run in runs]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_weighting_the_rare_class_makes_the_model_predict_it(tmp_path, assets, imbalanced_files):
    """Same data, seed and schedule: unweighted, the rare class is never predicted; weighted 8x, it is found.
    (The macro-F1 gain of `balanced` on real data is measured in docs/benchmarks.md.)"""
    finals = {}
    for name, weights in (("plain", None), ("weighted", [1.0, 8.0, 1.0])):
        out = train(tmp_path, name, weighted_recipe(assets, imbalanced_files, tmp_path / name, weights,
                                                    training={"epochs": 4, "lr": 3e-3}))
        finals[name] = read_run_summary(out)["final_eval"]
    assert finals["plain"]["predicted"]["LABEL_1"] == 0 < finals["weighted"]["predicted"]["LABEL_1"], finals
    assert finals["weighted"]["per_class"]["LABEL_1"]["recall"] == 1.0


@pytest.mark.parametrize("task, extra, message", [
    ({"problem_type": "regression", "num_labels": 3}, {}, "regression predicts one number"),
    ({"problem_type": "multi_label", "num_labels": None}, {}, "needs num_labels"),
    ({"num_labels": 2, "threshold": 0.3}, {}, "threshold applies to problem_type multi_label only"),
    ({"problem_type": "regression", "num_labels": None}, {"training": {"class_weights": "balanced"}}, "class_weights apply to"),
    ({"num_labels": 2}, {"training": {"class_weights": [1.0, 2.0, 3.0]}}, "has 3 weights but task.num_labels is 2"),
    ({"num_labels": 2}, {"training": {"class_weights": [1.0, 0.0]}}, "greater than 0"),
    ({"problem_type": "regression", "num_labels": None}, {"evaluation": {"metrics": ["accuracy"]}}, "do not apply to regression"),
    ({"problem_type": "multi_label", "num_labels": 2}, {"evaluation": {"metrics": ["f1"]}}, "do not apply to multi_label"),
    ({"num_labels": 2}, {"data": {"label_columns": ["a", "b"]}}, "apply to problem_type multi_label only"),
    ({"problem_type": "multi_label", "num_labels": 3}, {"data": {"label_columns": ["a", "b"]}}, "has 2 columns but task.num_labels is 3"),
])
def test_problem_type_recipe_errors(assets, tmp_path, task, extra, message):
    recipe = tiny_recipe(assets, tmp_path / "out", task=task, **{"evaluation": {"metrics": None}, **extra})
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path / "bad.yaml", recipe))


def test_resolved_recipes_of_each_problem_type_reload(assets, tmp_path, topic_files, rating_files):
    from launcher.train.run_directory import recipe_yaml
    multi = multi_label_recipe(assets, topic_files, tmp_path / "m")
    multi["task"]["threshold"] = 0.3
    for name, raw in (("multi", multi), ("sts", regression_recipe(assets, rating_files, tmp_path / "s"))):
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", raw))
        (tmp_path / f"{name}.resolved.yaml").write_text(recipe_yaml(recipe))
        assert load_recipe(tmp_path / f"{name}.resolved.yaml") == recipe


@pytest.mark.parametrize("labels, message", [
    ([["blame"], ["praise", "nonsense"]], r"labels \['nonsense'\] not in data.label_names"),
    (["blame", "praise"], "multi_label wants a list of class names or ids per row"),
    ([[0], [5]], r"row 1 holds \[5\]: ids must be in \[0, 3\)"),
])
def test_multi_label_bad_labels_are_named(assets, tmp_path, labels, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "the film", "topics": row} for row in labels])
    data = {"train_file": str(path), "eval_file": None, "label_field": "topics", "label_names": TOPIC_NAMES}
    raw = tiny_recipe(assets, tmp_path / "out", data=data, task={"problem_type": "multi_label", "num_labels": 3},
                      evaluation={"metrics": None})
    with pytest.raises(DataError, match=message):
        prepared(assets, tmp_path, raw)


@pytest.mark.parametrize("column_values, problem_type, message", [
    (["1", "2"], "multi_label", "column 'praise' must hold 0 or 1"),
    (["1.5", ""], "regression", r"column 'score' is empty or not a finite number in row\(s\) \[1\]"),
    (["1.5", "high"], "regression", "regression labels are numbers"),
])
def test_column_labels_that_are_not_numbers_are_named(assets, tmp_path, column_values, problem_type, message):
    if problem_type == "multi_label":
        rows = [{"text": "a film", "praise": value, "blame": "0", "style": "0"} for value in column_values]
        data, task = {"label_columns": TOPIC_NAMES}, {"problem_type": "multi_label", "num_labels": 3}
    else:
        rows = [{"text": "a film", "score": value} for value in column_values]
        data, task = {"label_field": "score"}, {"problem_type": "regression", "num_labels": None}
    path = write_csv(tmp_path / "bad.csv", rows)
    raw = tiny_recipe(assets, tmp_path / "out", data={"train_file": str(path), "eval_file": None, **data}, task=task,
                      evaluation={"metrics": None})
    with pytest.raises(DataError, match=message):
        prepared(assets, tmp_path, raw)


@pytest.mark.parametrize("name, task_line", [
    ("stsb_bert.yaml", "task : regression on sentence pairs, metrics loss, pearson, spearman, mse"),
    ("go_emotions_bert.yaml", "task : multi-label single text, 28 classes, threshold 0.3, metrics loss, f1_micro, f1_macro, exact_match"),
])
def test_shipped_problem_type_recipes_pass_check(name, task_line, capsys):
    """Offline the hub data cannot be read: --check says so and still checks everything else."""
    from launcher.run import main

    assert main([str(REPO / "recipes" / name), "--check"]) == 0
    out = capsys.readouterr().out
    assert task_line in out and "check: ok" in out
