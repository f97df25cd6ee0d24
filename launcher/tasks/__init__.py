"""One module per kind of fine-tuning behind `launcher.tasks.base.Task`, chosen once from the recipe's `task`
(its `type`, and for classification its `problem_type`): classification (`sequence_classification/`), SFT
(`causal_lm/`), reward modelling and DPO (`preference/`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from launcher.data.preparation import MapPlan, Preparation, prepared_once
from launcher.data.sources import Splits, load_splits
from launcher.recipe.schema import Recipe
from launcher.tasks.base import PredictingTask, Prepared, Task
from launcher.tasks.causal_lm.task import CausalLanguageModeling
from launcher.tasks.preference.dpo import DirectPreferenceOptimization
from launcher.tasks.preference.reward import RewardModeling
from launcher.tasks.sequence_classification.multi_label import MultiLabelClassification
from launcher.tasks.sequence_classification.regression import Regression
from launcher.tasks.sequence_classification.single_label import SequenceClassification

CLASSIFICATION_PROBLEMS: dict[str, type[SequenceClassification]] = {
    task.problem_type: task for task in (SequenceClassification, MultiLabelClassification, Regression)
}


TASKS_OF_TYPE: dict[str, type[Task]] = {
    "causal_lm": CausalLanguageModeling, "reward": RewardModeling, "dpo": DirectPreferenceOptimization,
}
"""The task of every `task.type` but sequence_classification, whose task is its problem type's."""


TASK_OUTPUT_FILES = tuple(dict.fromkeys(name for task in (*TASKS_OF_TYPE.values(), *CLASSIFICATION_PROBLEMS.values())
                                        for name in task.output_files))
"""What any task writes into a run directory."""


def task_class(recipe: Recipe) -> type[Task]:
    if recipe.task.type in TASKS_OF_TYPE:
        return TASKS_OF_TYPE[recipe.task.type]
    return CLASSIFICATION_PROBLEMS[recipe.task.problem_type]


def exported_task_section(config: PretrainedConfig) -> dict[str, Any]:
    """The `task` section of an exported classifier's recipe, from the `problem_type` transformers keeps in its
    config (a config without one is single-label, as transformers reads it)."""
    task = next((task for task in CLASSIFICATION_PROBLEMS.values() if task.hf_problem_type == config.problem_type),
                SequenceClassification)
    return task.exported_task_section(config)


def prepare_task(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: Optional[Splits] = None,
                 map_plan: MapPlan = MapPlan()) -> Prepared:
    """The recipe's task built from its raw splits (read from `recipe.data` unless given), with the tokenized
    splits (mapped as `map_plan` says) and the plan's notes."""
    task = task_class(recipe)
    if splits is None:
        splits = load_splits(recipe.data, task.columns(recipe))
    return task.prepare(recipe, tokenizer, replace(splits, map_plan=map_plan))


def prepare_task_once(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> tuple[Prepared, Preparation]:
    """`prepare_task` through the preparation cache: tokenized by the first process to ask, read back by the rest."""
    return prepared_once(recipe, tokenizer, lambda plan: prepare_task(recipe, tokenizer, map_plan=plan))


def predicting_task_class(recipe: Recipe) -> type[PredictingTask] | None:
    """The recipe's task when `launcher.predict` serves its models, else None."""
    task = task_class(recipe)
    return task if issubclass(task, PredictingTask) else None
