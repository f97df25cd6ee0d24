"""One module per kind of fine-tuning behind `launcher.tasks.base.Task`, chosen once from the recipe's `task`
(its `type`, and for classification its `problem_type`)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from launcher.recipe import Recipe
from launcher.tasks.base import Task
from launcher.tasks.causal_lm import CausalLanguageModeling
from launcher.tasks.classification import SequenceClassification
from launcher.tasks.multi_label import MultiLabelClassification
from launcher.tasks.regression import Regression

CLASSIFICATION_PROBLEMS: dict[str, type[Task]] = {
    "single_label": SequenceClassification,
    "multi_label": MultiLabelClassification,
    "regression": Regression,
}


TASK_OUTPUT_FILES = tuple(dict.fromkeys(name for task in (CausalLanguageModeling, *CLASSIFICATION_PROBLEMS.values())
                                        for name in task.output_files))
"""What any task writes into a run directory."""


def task_class(recipe: Recipe) -> type[Task]:
    if recipe.task.type == "causal_lm":
        return CausalLanguageModeling
    return CLASSIFICATION_PROBLEMS[recipe.task.problem_type]


def build_task(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Task:
    return task_class(recipe)(recipe, tokenizer)
