"""Small valid recipes over the tiny assets of `conftest.assets`, as dicts to change and as files to run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from launcher.model.loading import load_tokenizer
from launcher.recipe.schema import Recipe
from launcher.tasks import prepare_task
from launcher.tasks.base import Prepared

def tiny_recipe(assets: dict[str, Path], out: Path, model: str = "bert", **sections: dict[str, Any]) -> dict[str, Any]:
    """A small valid recipe as a dict; `sections` are merged over the defaults section by section."""
    recipe: dict[str, Any] = {
        "model": {"name_or_path": str(assets[model])},
        "data": {"train_file": str(assets["train_csv"]), "eval_file": str(assets["eval_csv"]), "max_length": 64},
        "task": {"num_labels": 2},
        "training": {"epochs": 2, "per_device_batch_size": 8, "lr": 1e-3, "log_every_steps": 1},
        "evaluation": {"metrics": ["accuracy", "f1"]},
        "output": {"dir": str(out), "report_to": "none"},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


FORMATS = {
    "chat": {"format": "chat"},
    "prompt_completion": {"format": "prompt_completion", "use_chat_template": False},  # plain text: prompt + completion + EOS
    "labelled": {"format": "labelled", "prompt_template": "review {text} verdict", "label_words": ["bad", "good"]},
}


def sft_recipe(assets, out: Path, fmt: str = "prompt_completion", **sections) -> dict:
    """A small causal_lm recipe on the tiny chat Llama; `sections` merge over these."""
    data = {"train_file": str(assets["sft_train"]), "eval_file": str(assets["sft_eval"]), "max_length": 64}
    if fmt == "labelled":
        data |= {"text_field": "prompt", "label_names": ["negative", "positive"]}
    recipe = tiny_recipe(assets, out, model="chat_llama", data=data,
                         training={"epochs": 1, "lr": 1e-2, "per_device_batch_size": 8},
                         evaluation={"metrics": ["accuracy"] if fmt == "labelled" else []})
    recipe["task"] = {"type": "causal_lm", **FORMATS[fmt], "generations": 2, "max_new_tokens": 4}
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def prepared(assets, tmp_path, fmt: str, **sections) -> tuple[Recipe, Prepared]:
    recipe = Recipe.model_validate(sft_recipe(assets, tmp_path / "out", fmt, **sections))
    return recipe, prepare_task(recipe, load_tokenizer(recipe.model))


def write_run(folder: Path, start_model: dict[str, Path], per_device: int, accumulation: int, **sections) -> Path:
    training = {"epochs": 1, "per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                **sections.pop("training", {})}
    recipe = tiny_recipe(start_model, folder / "out", model="start", training=training,
                         output={"save_every_epoch": False}, **sections)
    return write_recipe(folder / "recipe.yaml", recipe)


def preference_recipe(assets, out: Path, task_type: str, **sections) -> dict:
    """A small reward or dpo recipe on the tiny chat Llama's pairs; `sections` merge over these."""
    data = {"train_file": str(assets["pairs_train"]), "eval_file": str(assets["pairs_eval"]), "max_length": 64}
    recipe = tiny_recipe(assets, out, model="chat_llama", data=data,
                         training={"epochs": 2, "lr": 1e-2, "per_device_batch_size": 4})
    recipe["evaluation"] = {}  # the pair tasks report their own metrics
    recipe["task"] = {"type": task_type, **({"generations": 2, "max_new_tokens": 4} if task_type == "dpo" else {})}
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe
