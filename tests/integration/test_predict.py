"""`python -m launcher.predict`: predictions in input order from every kind of saved model (run directory, exported
model, LoRA adapter, checkpoint, a model folder copied away from its run), `--evaluate` reproducing the run's own
evaluation, the three problem types, and bad input named by file, row and column with no half-written output."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from builders import rating_rows, sentiment_rows, topic_rows, write_csv, write_jsonl
from recipes import tiny_recipe, write_recipe
from launching import CPU_DEEPSPEED, launch
from runs import REPO, assert_predictions_agree, read_csv, run_in_process
from launcher.predict import main as predict
from launcher.serve.files import written_atomically
from launcher.recipe.loading import load_recipe
from launcher.train.run_directory import read_run_summary


def train(root: Path, assets, name: str, **sections) -> Path:
    out = root / name
    assert run_in_process(write_recipe(root / f"{name}.yaml", tiny_recipe(assets, out, **sections))) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, assets) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    topics = {"train_file": str(write_jsonl(root / "topics_train.jsonl", topic_rows(64, seed=40))),
              "eval_file": str(write_jsonl(root / "topics_eval.jsonl", topic_rows(24, seed=41))), "label_field": "topics"}
    ratings = {"train_file": str(write_csv(root / "ratings_train.csv", rating_rows(64, seed=42))),
               "eval_file": str(write_csv(root / "ratings_eval.csv", rating_rows(24, seed=43))), "label_field": "score"}
    skewed = {"train_file": str(write_csv(root / "skewed_train.csv", skewed_rows(96, seed=44))),
              "eval_file": str(write_csv(root / "skewed_eval.csv", skewed_rows(48, seed=45)))}
    balanced = {"epochs": 1, "class_weights": "balanced"}
    return {
        "single": train(root, assets, "single", training={"epochs": 2}),
        "lora": train(root, assets, "lora", model="llama", lora={"enabled": True, "r": 4}, training={"epochs": 1}),
        "multi": train(root, assets, "multi", data=topics, task={"problem_type": "multi_label", "num_labels": 3},
                       evaluation={"metrics": ["f1_micro", "exact_match"]}, training={"epochs": 1}),
        "regression": train(root, assets, "regression", data=ratings, task={"problem_type": "regression", "num_labels": None},
                            evaluation={"metrics": ["pearson", "mse"]}, training={"epochs": 1}),
        "weighted": train(root, assets, "weighted", data=skewed, training=balanced),
        "weighted_multi": train(root, assets, "weighted_multi", data=topics, task={"problem_type": "multi_label", "num_labels": 3},
                                evaluation={"metrics": ["f1_micro"]}, training=balanced),
    }


def skewed_rows(n: int, seed: int) -> list[dict]:
    """Sentiment rows with about three negative reviews to a positive one."""
    return [row for i, row in enumerate(sentiment_rows(n, seed)) if row["label"] == 0 or i % 3 == 0]


def test_predictions_keep_the_input_order_and_match_the_model_row_by_row(runs, assets, tmp_path):
    output = tmp_path / "out.csv"
    assert predict([str(runs["single"]), "--input", str(assets["eval_csv"]), "--output", str(output), "--batch-size", "5"]) == 0
    rows, inputs = read_csv(output), read_csv(assets["eval_csv"])
    assert [row["text"] for row in rows] == [row["text"] for row in inputs]
    assert list(rows[0]) == ["idx", "text", "label", "predicted_label", "predicted_id", "probability_LABEL_0", "probability_LABEL_1"]
    model = AutoModelForSequenceClassification.from_pretrained(runs["single"] / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(runs["single"] / "model")
    for row in rows:  # one row at a time, no padding: batching and length sorting must not change anything
        with torch.no_grad():
            probabilities = model(**tokenizer(row["text"], return_tensors="pt")).logits.softmax(-1)[0]
        assert [float(row["probability_LABEL_0"]), float(row["probability_LABEL_1"])] == pytest.approx(probabilities.tolist(), abs=1e-5)
        assert int(row["predicted_id"]) == int(probabilities.argmax()) and row["predicted_label"] == f"LABEL_{row['predicted_id']}"


def test_evaluate_reproduces_the_runs_own_final_evaluation(runs, assets, tmp_path, capsys):
    output = tmp_path / "eval.jsonl"
    assert predict([str(runs["single"]), "--input", str(assets["eval_csv"]), "--output", str(output), "--evaluate"]) == 0
    final = read_run_summary(runs["single"])["final_eval"]
    metrics = json.loads((tmp_path / "eval.metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(final["loss"], abs=1e-5)
    assert (metrics["accuracy"], metrics["f1"], metrics["confusion"]) == (final["accuracy"], final["f1"], final["confusion"])
    printed = capsys.readouterr().out
    assert "evaluation of 32 rows" in printed and "true \\ predicted" in printed
    assert len(output.read_text().splitlines()) == 32 and "predicted_label" in json.loads(output.read_text().splitlines()[0])


@pytest.mark.parametrize("name", ["weighted", "weighted_multi"])
def test_evaluate_weighs_the_loss_as_the_run_did(runs, tmp_path, name):
    """`training.class_weights: balanced` (single_label class weights, multi_label BCE pos_weight), worked out from
    the run's training set: the exported model and the last checkpoint report the run's own final eval loss
    (--evaluate used to leave the weights out: 0.6976 against the run's 1.2261 in the review)."""
    run = runs[name]
    eval_file = load_recipe(run / "recipe.resolved.yaml").data.eval_file
    final = read_run_summary(run)["final_eval"]["loss"]
    for source in (run, sorted((run / "checkpoints").iterdir())[-1]):
        assert predict([str(source), "--input", eval_file, "--output", str(tmp_path / "p.csv"), "--evaluate"]) == 0
        assert json.loads((tmp_path / "p.metrics.json").read_text())["loss"] == pytest.approx(final, abs=1e-5), source


def test_overrides_for_the_input_leave_the_runs_training_rows_alone(runs, tmp_path):
    """The weights come from the training rows read with the run's recipe: `data.label_field=sentiment` names the
    input file's column, not the training file's."""
    eval_file = Path(load_recipe(runs["weighted"] / "recipe.resolved.yaml").data.eval_file)
    inputs = write_csv(tmp_path / "renamed.csv", [{"review": row["text"], "sentiment": row["label"]} for row in read_csv(eval_file)])
    assert predict([str(runs["weighted"]), "--input", str(inputs), "--output", str(tmp_path / "p.csv"), "--evaluate",
                    "data.text_field=review", "data.label_field=sentiment"]) == 0
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(read_run_summary(runs["weighted"])["final_eval"]["loss"], abs=1e-5)


def test_checkpoint_and_exported_model_predict_the_same(runs, assets, tmp_path):
    checkpoint = sorted((runs["single"] / "checkpoints").iterdir())[-1]  # the last epoch's: the exported weights
    assert_predictions_agree(checkpoint, runs["single"] / "model", assets["eval_csv"], tmp_path)


@pytest.mark.slow
def test_predict_gathers_a_deepspeed_zero_checkpoint(assets, tmp_path):
    """A 2-process ZeRO-2 run: its checkpoint holds DeepSpeed shards, gathered into the exported weights."""
    recipe = write_recipe(tmp_path / "zero.yaml", tiny_recipe(assets, tmp_path / "zero", model="bert_no_dropout",
                                                              training={"epochs": 1, "per_device_batch_size": 4}))
    result = launch("accelerate_configs/zero2.yaml", recipe, CPU_DEEPSPEED)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = sorted((tmp_path / "zero" / "checkpoints").iterdir())[-1]
    assert (checkpoint / "pytorch_model").is_dir() and not (checkpoint / "model.safetensors").exists()
    assert_predictions_agree(checkpoint, tmp_path / "zero" / "model", assets["eval_csv"], tmp_path)


def test_lora_adapter_evaluates_as_the_run_did(runs, assets, tmp_path):
    """A Llama without a pad token, trained as LoRA: the adapter is rebuilt on its base with the run's labels."""
    assert not (runs["lora"] / "model").exists()
    assert predict([str(runs["lora"]), "--input", str(assets["eval_csv"]), "--output", str(tmp_path / "p.parquet"), "--evaluate"]) == 0
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(read_run_summary(runs["lora"])["final_eval"]["loss"], abs=1e-5)
    assert (tmp_path / "p.parquet").stat().st_size > 0


def test_a_model_folder_away_from_its_run_uses_its_config(runs, assets, tmp_path):
    alone = shutil.copytree(runs["single"] / "model", tmp_path / "copied")
    assert predict([str(alone), "--input", str(assets["eval_csv"]), "--output", str(tmp_path / "a.csv")]) == 0
    assert predict([str(runs["single"]), "--input", str(assets["eval_csv"]), "--output", str(tmp_path / "b.csv")]) == 0
    assert read_csv(tmp_path / "a.csv") == read_csv(tmp_path / "b.csv")


def test_multi_label_predictions_and_evaluation(runs, tmp_path):
    eval_file = load_recipe(runs["multi"] / "recipe.resolved.yaml").data.eval_file
    assert predict([str(runs["multi"]), "--input", eval_file, "--output", str(tmp_path / "m.csv"), "--evaluate"]) == 0
    rows = read_csv(tmp_path / "m.csv")
    names = ["blame", "praise", "style"]
    for row in rows:
        chosen = [name for name in names if float(row[f"probability_{name}"]) >= 0.5]
        assert row["predicted_labels"] == "|".join(chosen)
    metrics, final = json.loads((tmp_path / "m.metrics.json").read_text()), read_run_summary(runs["multi"])["final_eval"]
    assert metrics["f1_micro"] == pytest.approx(final["f1_micro"]) and metrics["loss"] == pytest.approx(final["loss"], abs=1e-5)


def test_regression_predictions_and_evaluation(runs, tmp_path):
    inputs = tmp_path / "ratings.csv"
    write_csv(inputs, rating_rows(24, seed=43))
    assert predict([str(runs["regression"]), "--input", str(inputs), "--output", str(tmp_path / "r.csv"), "--evaluate"]) == 0
    rows = read_csv(tmp_path / "r.csv")
    assert list(rows[0]) == ["text", "score", "predicted_score"]
    metrics, final = json.loads((tmp_path / "r.metrics.json").read_text()), read_run_summary(runs["regression"])["final_eval"]
    assert metrics["pearson"] == pytest.approx(final["pearson"], abs=1e-4) and metrics["mse"] == pytest.approx(final["mse"], rel=1e-4)


@pytest.mark.parametrize("rows, flags, message", [
    ([{"review": "good film"}], [], r"missing column\(s\) \['text'\]"),
    ([{"text": "good film"}, {"text": ""}], [], r"column 'text' is empty or not text in row\(s\) \[1\]"),
    ([{"text": "good film", "label": 0}, {"text": "bad", "label": 7}], ["--evaluate"], r"has labels \[7\] in row\(s\) \[1\]"),
    ([{"text": "good film"}], ["--evaluate"], r"missing column\(s\) \['label'\]"),
    ([{"text": "good film", "label": 0}, {"text": "bad", "label": ""}, {"text": "fine", "label": 1}], ["--evaluate"],
     r"column 'label' is blank in row\(s\) \[1\]; every example needs a label"),
])
def test_bad_input_is_named_and_leaves_the_old_output_alone(runs, tmp_path, capsys, rows, flags, message):
    inputs = write_csv(tmp_path / "in.csv", rows)
    output = tmp_path / "out.csv"
    output.write_text("earlier predictions\n")
    assert predict([str(runs["single"]), "--input", str(inputs), "--output", str(output), *flags]) == 1
    error = capsys.readouterr().err
    assert f"{inputs}: " in error and re.search(message, error), error
    assert output.read_text() == "earlier predictions\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "p.csv"
    with pytest.raises(KeyboardInterrupt):
        with written_atomically(target) as temporary:
            temporary.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_text_column_override_and_cli(runs, tmp_path):
    inputs = write_csv(tmp_path / "reviews.csv", [{"review": "good great film"}, {"review": "bad awful"}])
    result = subprocess.run([sys.executable, "-m", "launcher.predict", str(runs["single"]), "--input", str(inputs),
                             "--output", str(tmp_path / "o.csv"), "data.text_field=review"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "predictions: 2 rows" in result.stdout and "predicting" in result.stderr  # the progress bar
    assert [row["review"] for row in read_csv(tmp_path / "o.csv")] == ["good great film", "bad awful"]


def test_input_that_is_not_utf8_is_named(runs, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes('{"text": "good film"}\n{"text": "très bon film"}\n'.encode("latin-1"))
    assert predict([str(runs["single"]), "--input", str(inputs), "--output", str(tmp_path / "o.csv")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {inputs}: not UTF-8 text (line 2: byte 0xe8); re-encode it as UTF-8"]


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_batch_size_must_be_a_positive_integer(tmp_path, capsys, value):
    """`--batch-size 0` used to end in a traceback (range() arg 3 must not be zero)."""
    with pytest.raises(SystemExit) as exit_info:
        predict([str(tmp_path), "--input", "in.csv", "--batch-size", value])
    assert exit_info.value.code == 2
    assert f"argument --batch-size: must be a positive integer, got {value!r}" in capsys.readouterr().err


def test_predictions_of_a_weighted_run_need_no_training_data(runs, tmp_path, capsys):
    """Only `--evaluate`'s loss needs the weights, and so the training rows they come from."""
    run = shutil.copytree(runs["weighted"], tmp_path / "run")
    resolved = run / "recipe.resolved.yaml"
    eval_file = load_recipe(resolved).data.eval_file
    resolved.write_text(resolved.read_text().replace(load_recipe(resolved).data.train_file, str(tmp_path / "gone.csv")))
    assert predict([str(run), "--input", eval_file, "--output", str(tmp_path / "p.csv")]) == 0
    assert predict([str(run), "--input", eval_file, "--output", str(tmp_path / "p.csv"), "--evaluate"]) == 1
    assert "training.class_weights come from the run's training data" in capsys.readouterr().err
