"""`task.type: reward`: a reward model on preference pairs (Ouyang et al. 2022; TRL's `RewardTrainer`).

The model is a sequence classifier with one output: the score of a prompt with an answer, read at its last token
by a decoder (transformers' rule: the last token that is not padding, so the pad token is set as for the Llama
classifier). Both answers of a pair run in the same forward; the loss of a pair is `-log sigmoid(r_chosen -
r_rejected - margin)` (plus the centring term when asked), summed over the counted pairs for the loop to average
over the pairs of the optimizer step. Evaluation gathers every pair's two rewards exactly: pairwise accuracy
(r_chosen > r_rejected), the mean margin between them, and the rewards' mean and spread.

`launcher.predict` serves reward models: a file of pairs gets both rewards (with `--evaluate`, the pairwise
accuracy), a file without the rejected column gets the reward of each prompt + answer. The exported config says
`problem_type: regression` (one unbounded output), so transformers' pipelines and a bare model folder given to
predict read the score as it is.
"""

from __future__ import annotations

from typing import Any, Optional

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from launcher.data.labels import LabelEncoder, LabelSpace
from launcher.data.sources import DataError, Splits, check_dataset_columns
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Batch, Evaluation, PredictingTask, Prepared
from launcher.tasks.preference.batches import PairTask
from launcher.tasks.preference.pairs import PairBuilder, PairReader, pair_splits
from launcher.tasks.sequence_classification.single_label import scores_of

REWARD = "reward"  # the name of the model's one output (config.id2label)
DPO_ONLY_COLUMNS = ["labels", "rejected_labels"]


def pair_rewards(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Each pair's (chosen, rejected) rewards, fp32, `[pairs, 2]`: both answers in one forward."""
    ids = batch["input_ids"]
    scores = model(input_ids=ids.flatten(0, 1), attention_mask=batch["attention_mask"].flatten(0, 1)).logits
    return scores.float().view(ids.shape[0], 2)


def reward_metrics(rewards: torch.Tensor, losses: torch.Tensor) -> dict[str, Any]:
    """Loss and pairwise scores of every pair's `[chosen, rejected]` rewards."""
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return {"loss": float(losses.mean()), "accuracy": float((chosen > rejected).double().mean()),
            "margin": float((chosen - rejected).mean()), "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()), "examples": len(rewards)}


class RewardModeling(PairTask, PredictingTask):
    model_class = AutoModelForSequenceClassification
    peft_task_type = TaskType.SEQ_CLS  # peft trains and saves the new one-output head (`score`) in full

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        margin = " - margin" if recipe.task.margin_field else ""
        centring = (f" + {recipe.task.center_rewards_coefficient:g} (r_c + r_r)^2"
                    if recipe.task.center_rewards_coefficient else "")
        return f"reward model on preference pairs (loss -log sigmoid(r_chosen - r_rejected{margin}){centring})"

    @classmethod
    def planned_config(cls, recipe: Recipe) -> dict[str, Any]:
        return {"num_labels": 1}

    @classmethod
    def prepare(cls, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> Prepared:
        _, train, evaluation = pair_splits(recipe, tokenizer, splits)
        data = Splits(train.dataset.remove_columns(DPO_ONLY_COLUMNS),
                      evaluation.dataset.remove_columns(DPO_ONLY_COLUMNS) if evaluation else None,
                      splits.train_origin, splits.eval_origin)
        task = cls(recipe, tokenizer, cls.resolve_labels(recipe, splits))
        return Prepared(task, data, train.notes + (evaluation.notes if evaluation else []))

    @classmethod
    def resolve_labels(cls, recipe: Recipe, splits: Optional[Splits]) -> LabelSpace:
        return LabelSpace([REWARD])

    @classmethod
    def label_encoder(cls, recipe: Recipe, labels: LabelSpace) -> LabelEncoder:
        """Predict's targets of a file of pairs: each pair's margin (0 without `task.margin_field`)."""
        reader = PairReader(recipe.task)

        def margins(batch: dict, indices: list[int], origin: str) -> list[float]:
            return [reader.margin(dict(zip(batch, values)), f"{origin} row {index}")
                    for index, values in zip(indices, zip(*batch.values()))]

        return margins

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1, "id2label": {0: REWARD}, "label2id": {REWARD: 0}, "problem_type": "regression"}

    def pair_losses(self, rewards: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - margin.to(rewards.device))
        coefficient = self.recipe.task.center_rewards_coefficient
        if coefficient:
            losses = losses + coefficient * rewards.sum(dim=1) ** 2
        return losses

    def loss(self, model: torch.nn.Module, batch: Batch, counted: torch.Tensor) -> torch.Tensor:
        losses = self.pair_losses(pair_rewards(model, batch), batch["margin"])
        return losses[counted.to(losses.device)].sum()

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> Evaluation:
        rewards, margins = [], []
        for batch in loader:
            gathered = accelerator.gather_for_metrics((pair_rewards(model, batch), batch["margin"]))
            rewards.append(gathered[0].cpu())
            margins.append(gathered[1].cpu())
        rewards = torch.cat(rewards)
        return Evaluation(reward_metrics(rewards, self.pair_losses(rewards, torch.cat(margins))))

    def answer_fields(self, dataset: datasets.Dataset) -> tuple[str, ...]:
        """The answers predict scores: chosen and rejected, or the chosen column alone where there is no other."""
        task = self.recipe.task
        return (task.chosen_field, task.rejected_field) if task.rejected_field in dataset.column_names else (task.chosen_field,)

    def check_input(self, dataset: datasets.Dataset, origin: str, evaluate: bool) -> None:
        task = self.recipe.task
        fields = self.answer_fields(dataset)
        if evaluate and len(fields) == 1:
            raise DataError(f"{origin}: --evaluate scores pairs: the file needs column {task.rejected_field!r} too")
        check_dataset_columns(dataset, origin, [name for name in (task.prompt_field, *fields) if name])
        reader = PairReader(task)
        for index in range(len(dataset)):
            reader.read(dataset[index], f"{origin} row {index}", fields)

    def logits(self, model: torch.nn.Module, dataset: datasets.Dataset, batch_size: int, device: torch.device) -> torch.Tensor:
        """Every row's rewards, `[rows, answers]`: each prompt + answer rendered and shortened as in training."""
        builder, fields = PairBuilder(self.recipe, self.tokenizer), self.answer_fields(dataset)
        sequences = []
        for index in range(len(dataset)):
            where = f"input row {index}"
            fitted = builder.fit(builder.reader.read(dataset[index], where, fields), where)
            sequences += [{"input_ids": tokenized.input_ids} for tokenized in fitted.tokenized]
        return scores_of(model, sequences, self.tokenizer, batch_size, device).view(len(dataset), len(fields))

    def prediction_columns(self, logits: torch.Tensor) -> dict[str, list]:
        if logits.shape[1] == 1:
            return {REWARD: logits[:, 0].tolist()}
        return {"reward_chosen": logits[:, 0].tolist(), "reward_rejected": logits[:, 1].tolist(),
                "prefers_chosen": (logits[:, 0] > logits[:, 1]).tolist()}

    def score_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> Evaluation:
        return Evaluation(reward_metrics(logits, self.pair_losses(logits, targets.float())))
