"""`problem_type: regression`: one number per example (GLUE STS-B's 0-5 similarity). A single output, mean squared
error, Pearson / Spearman correlation, MSE and MAE. The model's one output is named after `data.label_field`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import PretrainedConfig

from launcher.data.labels import LabelEncoder, LabelSpace
from launcher.data.sources import DataError, Splits
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Evaluation
from launcher.tasks.metrics import compute_metrics, write_regression_png
from launcher.tasks.sequence_classification.single_label import SequenceClassification, texts_of


REGRESSION_PNG = "regression.png"


class Regression(SequenceClassification):
    problem_type = "regression"
    hf_problem_type = "regression"

    @classmethod
    def exported_task_section(cls, config: PretrainedConfig) -> dict[str, Any]:
        return {"problem_type": cls.problem_type}  # one output, named after the label field
    output_files = (REGRESSION_PNG,)

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        return f"regression on {texts_of(recipe)}"

    @classmethod
    def resolve_labels(cls, recipe: Recipe, splits: Splits) -> LabelSpace:
        field = recipe.data.label_field
        for dataset, origin in ((splits.train, splits.train_origin), (splits.eval, splits.eval_origin)):
            if dataset is not None and not getattr(dataset.features[field], "dtype", "").startswith(("float", "int")):
                raise DataError(f"{origin}: column {field!r} holds {dataset.features[field]}; regression labels are numbers")
        return LabelSpace([field])

    @classmethod
    def label_encoder(cls, recipe: Recipe, labels: LabelSpace) -> LabelEncoder:
        field = recipe.data.label_field

        def encode(batch: dict, indices: list[int], origin: str) -> list[float]:
            bad = [row for row, value in zip(indices, batch[field]) if value is None or not math.isfinite(value)]
            if bad:
                raise DataError(f"{origin}: column {field!r} is empty or not a finite number in row(s) {bad[:10]}")
            return [float(value) for value in batch[field]]

        return encode

    def model_kwargs(self) -> dict[str, Any]:
        return super().model_kwargs() | {"num_labels": 1}

    def class_ids(self, train: datasets.Dataset) -> Optional[np.ndarray]:
        return None

    def example_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="none")

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().squeeze(-1)

    def prediction_columns(self, logits: torch.Tensor) -> dict[str, list]:
        return {f"predicted_{self.labels.names[0]}": self.predictions(logits).tolist()}

    def score(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, Any]:
        return compute_metrics(self.recipe.metric_names, predictions, references)

    def summary(self, evaluation: Evaluation) -> str:
        return ""  # no classes to tabulate

    def report(self, evaluation: Evaluation, model: torch.nn.Module, accelerator: Accelerator, step: int,
               run_dir: Path) -> None:
        """Predicted against true values as a PNG (the per-class report's counterpart)."""
        if accelerator.is_main_process:
            write_regression_png(*evaluation.scored, self.labels.names[0], run_dir / REGRESSION_PNG)
