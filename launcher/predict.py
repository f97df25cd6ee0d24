"""Use a trained classifier on new data: every row's prediction, or the recipe's metrics on a labelled file.

    python -m launcher.predict outputs/demo --input reviews.csv --output predictions.csv
    python -m launcher.predict outputs/demo --input data/rotten_tomatoes/test.csv --evaluate
    python -m launcher.predict outputs/demo/checkpoints/step-00000125 --input reviews.jsonl data.text_field=review

SOURCE is a run directory (its `model/`, else its `adapter/`, else its newest sealed checkpoint), an exported
model folder, a LoRA adapter folder or a checkpoint folder. The run's `recipe.resolved.yaml` (found beside
them) says which columns hold the text and the labels and how long inputs may be; `section.key=value`
overrides change that for the input file (`data.text_field=review`, `task.threshold=0.3`). A model folder
copied away from its run is read with the recipe defaults (column `text`) and its config's problem type.

Rows are tokenized as in training (truncated at `data.max_length`) and run longest first in batches padded to
their longest member. The output is the input's columns plus the predictions, in input order: the predicted
label name and id and every class's probability (single_label), the predicted labels and every class's
probability (multi_label), or the predicted value (regression). It is written to a temporary file and renamed
into place, so an error or a kill never leaves half a file. Formats follow the file suffix (.csv .json .jsonl
.parquet); in CSV a list of labels is joined with `|`. The command line of launcher/serve/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import datasets
import torch

from launcher.data.sources import DataError
from launcher.recipe.loading import RecipeError
from launcher.serve.files import output_rows, read_input, write_rows, write_text
from launcher.serve.trained import PredictError, Predictor, load_predictor
from launcher.tasks.base import Evaluation, PredictingTask
from launcher.train.checkpoints import CheckpointError


def evaluate(predictor: Predictor, dataset: datasets.Dataset, logits: torch.Tensor, origin: str) -> Evaluation:
    """The recipe's metrics (and the per-class report) of `logits` against the file's labels."""
    task = predictor.task
    targets = task.label_encoder(task.recipe, task.labels)(dataset.to_dict(), list(range(len(dataset))), origin)
    return task.score_logits(logits, torch.tensor(targets))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Predict with a trained classifier, or evaluate it on a labelled file.")
    parser.add_argument("source", help="run directory, exported model folder, LoRA adapter folder or checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="recipe overrides for the input, e.g. data.text_field=review task.threshold=0.3")
    parser.add_argument("--input", required=True, help="rows to predict: .csv, .json, .jsonl or .parquet")
    parser.add_argument("--output", default="predictions.csv", help="where the predictions go (default: predictions.csv)")
    parser.add_argument("--evaluate", action="store_true",
                        help="the input is labelled: print and write the recipe's metrics and the per-class table "
                             "(to OUTPUT's name with .metrics.json)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="rows per forward pass (default 32)")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    try:
        predictor = load_predictor(Path(args.source), args.overrides, args.evaluate)
        dataset = read_input(args.input, args.evaluate, predictor.task)
        logits = predictor.task.logits(predictor.model, dataset, args.batch_size, predictor.device)
        evaluation = evaluate(predictor, dataset, logits, args.input) if args.evaluate else None
        write_rows(output_rows(dataset, predictor.task.prediction_columns(logits), output), output)
        print(f"predictions: {len(dataset)} rows -> {output}")
        if evaluation is not None:
            report(evaluation, predictor.task, output.with_suffix(".metrics.json"))
    except (PredictError, DataError, RecipeError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def report(evaluation: Evaluation, task: PredictingTask, path: Path) -> None:
    metrics = evaluation.metrics
    headline = {name: round(value, 4) for name, value in metrics.items() if isinstance(value, float)}
    print(f"evaluation of {metrics['examples']} rows: {headline}")
    print(task.summary(evaluation), end="")
    write_text(json.dumps(metrics, indent=2), path)
    print(f"metrics -> {path}")


if __name__ == "__main__":
    sys.exit(main())
