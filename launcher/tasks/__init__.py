"""One module per kind of fine-tuning behind `launcher.tasks.base.Task`, chosen once from `task.type`."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from launcher.recipe import Recipe
from launcher.tasks.base import Task
from launcher.tasks.causal_lm import CausalLanguageModeling
from launcher.tasks.classification import SequenceClassification

TASKS: dict[str, type[Task]] = {
    "sequence_classification": SequenceClassification,
    "causal_lm": CausalLanguageModeling,
}


def build_task(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Task:
    return TASKS[recipe.task.type](recipe, tokenizer)
