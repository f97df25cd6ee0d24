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
.parquet); in CSV a list of labels is joined with `|`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import datasets
import numpy as np
import torch
from peft import PeftModel
from transformers import AutoConfig

from launcher.data.labels import LabelSpace, check_labels_present
from launcher.data.sources import FILE_BUILDERS, DataError, check_dataset_columns, load_file as load_data_file, load_splits
from launcher.distributed.devices import detect_device
from launcher.distributed.library_messages import name_deepspeed_accelerator
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.loading import RecipeError, build_recipe, load_raw
from launcher.recipe.schema import LoraSection, Recipe
from launcher.tasks import exported_task_section, predicting_task_class
from launcher.tasks.base import Evaluation, PredictingTask
from launcher.tasks.sequence_classification.tokenization import check_texts
from launcher.train.checkpoints import CHECKPOINTS, MANIFEST, CheckpointError, checkpoint_state_dict, sealed_checkpoints
from launcher.train.run_directory import RESOLVED_RECIPE

class PredictError(ValueError):
    """The source cannot be used for predictions as asked."""


@dataclass
class Source:
    """What SOURCE turned out to be."""

    kind: str  # "model", "adapter" or "checkpoint"
    folder: Path
    recipe_file: Optional[Path]


@dataclass
class Predictor:
    recipe: Recipe
    task: PredictingTask
    model: torch.nn.Module
    device: torch.device


def resolve_source(path: Path) -> Source:
    """A run directory stands for its final model (or adapter, or newest checkpoint); the recipe is the run's."""
    if not path.is_dir():
        raise PredictError(f"{path}: not a folder (give a run directory, a model, adapter or checkpoint folder)")
    if (path / RESOLVED_RECIPE).is_file():
        for name in ("model", "adapter"):
            if (path / name).is_dir():
                return resolve_source(path / name)
        checkpoints = sealed_checkpoints(path / CHECKPOINTS)
        if not checkpoints:
            raise PredictError(f"{path}: a run directory with no model/, adapter/ or sealed checkpoint yet")
        return resolve_source(checkpoints[-1])
    recipe_file = next((folder / RESOLVED_RECIPE for folder in (path.parent, path.parent.parent)
                        if (folder / RESOLVED_RECIPE).is_file()), None)
    if (path / MANIFEST).is_file():
        if recipe_file is None:
            raise PredictError(f"{path}: a checkpoint needs its run's {RESOLVED_RECIPE} (two folders up) to rebuild the model")
        return Source("checkpoint", path, recipe_file)
    if (path / "adapter_config.json").is_file():
        if recipe_file is None:
            raise PredictError(f"{path}: a LoRA adapter needs its run's {RESOLVED_RECIPE} (one folder up) for the base "
                               "model and the class names")
        return Source("adapter", path, recipe_file)
    if (path / "config.json").is_file():
        return Source("model", path, recipe_file)
    raise PredictError(f"{path}: holds no {RESOLVED_RECIPE}, config.json, adapter_config.json or {MANIFEST}")


def recipe_for(source: Source, overrides: list[str]) -> Recipe:
    """The run's recipe, pointed at `source`; for a model folder without its run, one built from its config."""
    if source.recipe_file is not None:
        raw = load_raw(source.recipe_file)
    else:
        config = AutoConfig.from_pretrained(source.folder)
        raw = {"model": {"name_or_path": str(source.folder)}, "data": {"train_file": "unused.csv"},
               "task": exported_task_section(config), "output": {"dir": str(source.folder)}}
    if source.kind == "model":
        raw["model"]["name_or_path"] = str(source.folder)  # the trained weights, not the run's starting point
    recipe = build_recipe(raw, overrides, str(source.recipe_file or source.folder))
    if predicting_task_class(recipe) is None:
        raise PredictError(f"{source.folder}: launcher.predict serves classification and regression models; a causal_lm "
                           "model generates text (AutoModelForCausalLM.generate)")
    return recipe


def load_predictor(path: Path, overrides: list[str], evaluate: bool) -> Predictor:
    """The model at `path` with its task; to `evaluate`, with the loss weights the run trained with (predictions
    alone need no training data)."""
    name_deepspeed_accelerator(detect_device())  # as in training: no DeepSpeed auto-detection warning on a CPU host
    source = resolve_source(path)
    recipe = recipe_for(source, overrides)
    task_type, tokenizer = predicting_task_class(recipe), load_tokenizer(recipe.model)
    if source.kind == "model":
        model = task_type.model_class.from_pretrained(source.folder)
    else:  # an adapter or a checkpoint carries the head's weights, not its names: the run's data has them
        model = load_trained(source, recipe, task_type(recipe, tokenizer, training_labels(recipe, task_type)))
    labels = LabelSpace([model.config.id2label[i] for i in range(model.config.num_labels)])
    weights = None
    if evaluate and recipe.training.class_weights is not None:
        weights = training_class_weights(recipe_for(source, []), task_type, labels)
    device = torch.device(detect_device().type)
    print(f"predict: {source.kind} {source.folder} ({recipe.task.problem_type}, {len(labels.names)} output(s) "
          f"{labels.names[:8]}{' ...' if len(labels.names) > 8 else ''}) on {device}")
    return Predictor(recipe, task_type(recipe, tokenizer, labels, weights), model.to(device).eval(), device)


def training_labels(recipe: Recipe, task_type: type[PredictingTask]) -> LabelSpace:
    """The class names in id order, worked out from the run's data as training did."""
    try:
        return task_type.resolve_labels(recipe, load_splits(recipe.data, task_type.columns(recipe)))
    except DataError as err:
        raise PredictError(f"the class names come from the run's training data, which cannot be read here: {err}") from err


def training_class_weights(run_recipe: Recipe, task_type: type[PredictingTask], labels: LabelSpace) -> Optional[torch.Tensor]:
    """The loss weights the run trained and evaluated with (`training.class_weights`), worked out again from the
    run's training rows as training did (`balanced` depends on them), read with the run's own recipe: overrides
    given for the input do not apply to its files. Recomputed rather than recorded: the weights are a function of
    the recipe and its data, which the run directory keeps, and a model folder copied away from its run has no
    recipe to weigh by."""
    try:
        splits = load_splits(run_recipe.data, task_type.columns(run_recipe))
        train = splits.train
        rows = train.select_columns(run_recipe.data.label_columns or [run_recipe.data.label_field]).to_dict()
        targets = task_type.label_encoder(run_recipe, labels)(rows, list(range(len(train))), splits.train_origin)
    except DataError as err:
        raise PredictError(f"training.class_weights come from the run's training data, which cannot be read here: {err}") from err
    return task_type.loss_weights(run_recipe, labels, np.asarray(targets))


def load_trained(source: Source, recipe: Recipe, task: PredictingTask) -> torch.nn.Module:
    """The recipe's model rebuilt as training built it (base, head, LoRA), with the trained weights put in."""
    if source.kind == "adapter":  # the base as training loaded it, then the trained adapter (and head) on it
        base, _ = load_model(recipe.model_copy(update={"lora": LoraSection()}), task, task.tokenizer)
        return PeftModel.from_pretrained(base, source.folder)
    model, _ = load_model(recipe, task, task.tokenizer)
    model.load_state_dict(checkpoint_state_dict(source.folder))
    return model


def read_input(path: str, recipe: Recipe, evaluate: bool, task: PredictingTask) -> datasets.Dataset:
    """The input rows, with the text columns (and, to evaluate, the label columns) checked."""
    dataset = load_data_file(path)
    data = recipe.data
    texts = [data.text_field] + ([data.text_pair_field] if data.text_pair_field else [])
    check_dataset_columns(dataset, path, task.columns(recipe) if evaluate else texts)
    check_texts(dataset.to_dict(), texts, list(range(len(dataset))), path)
    if evaluate and not data.label_columns:
        check_labels_present(dataset, path, data.label_field)
    return dataset


def evaluate(predictor: Predictor, dataset: datasets.Dataset, logits: torch.Tensor, origin: str) -> Evaluation:
    """The recipe's metrics (and the per-class report) of `logits` against the file's labels."""
    task = predictor.task
    targets = task.label_encoder(task.recipe, task.labels)(dataset.to_dict(), list(range(len(dataset))), origin)
    return task.score_logits(logits, torch.tensor(targets))


def output_rows(dataset: datasets.Dataset, columns: dict[str, list], path: Path) -> datasets.Dataset:
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    if path.suffix.lower() == ".csv":  # CSV has no lists: `a|b`
        lists = [name for name, feature in dataset.features.items() if isinstance(feature, (datasets.List, datasets.Sequence))]
        if lists:
            dataset = dataset.map(lambda row: {name: "|".join(map(str, row[name] or [])) for name in lists})
    return dataset


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it once the writer succeeded (removed if it failed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_rows(dataset: datasets.Dataset, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise PredictError(f"--output {path}: use one of {', '.join(FILE_BUILDERS)}")
    with written_atomically(path) as temporary:
        if suffix == ".csv":
            dataset.to_csv(temporary, index=False)
        elif suffix == ".parquet":
            dataset.to_parquet(temporary)
        else:
            dataset.to_json(temporary, lines=suffix == ".jsonl", force_ascii=False)


def write_text(text: str, path: Path) -> None:
    with written_atomically(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


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
        dataset = read_input(args.input, predictor.recipe, args.evaluate, predictor.task)
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
