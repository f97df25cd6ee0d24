"""A trained classifier (or reward model) found and rebuilt from what a run left: a run directory, an exported
model, a LoRA adapter or a checkpoint, with the run's recipe (overrides apply to the input), its task and, to
evaluate, the loss weights the run trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoConfig

from launcher.data.labels import LabelSpace
from launcher.data.sources import DataError, load_splits
from launcher.distributed.devices import detect_device
from launcher.distributed.library_messages import name_deepspeed_accelerator
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.loading import build_recipe, load_raw
from launcher.recipe.schema import LoraSection, Recipe
from launcher.tasks import exported_task_section, predicting_task_class
from launcher.tasks.base import PredictingTask
from launcher.train.checkpoint_layouts import full_state_dict
from launcher.train.checkpoints import CHECKPOINTS, MANIFEST, sealed_checkpoints
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
        raise PredictError(f"{source.folder}: launcher.predict serves classifiers, regression and reward models; a "
                           f"{recipe.task.type} model generates text (AutoModelForCausalLM.generate)")
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
    print(f"predict: {source.kind} {source.folder} ({task_type.describe(recipe)}; {len(labels.names)} output(s) "
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
    model.load_state_dict(full_state_dict(source.folder))
    return model
