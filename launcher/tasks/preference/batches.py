"""Preference batches: each pair's two answers side by side, `[pairs, 2, width]` (chosen first), so that the loop
counts a pair as one example (its fingerprint, whether it is a repeat of an epoch's last round) and both answers'
tokens as what ran; and `PairTask`, what the two preference tasks share around them."""

from __future__ import annotations

from typing import Any, Optional

import torch

from launcher.recipe.schema import Recipe
from launcher.tasks.base import Batch, Collator, Task
from launcher.tasks.causal_lm.batches import next_token_targets
from launcher.tasks.causal_lm.rendering import IGNORE
from launcher.tasks.preference.pairs import pair_columns


class PairCollator:
    """Both answers of every pair padded to the batch's longest (a multiple of `multiple`) or to `width`; with
    `targets`, the answers' next-token targets (DPO) beside them."""

    def __init__(self, pad_token_id: int, multiple: Optional[int], width: Optional[int], targets: bool):
        self.pad_token_id = pad_token_id
        self.multiple = multiple
        self.width = width
        self.targets = targets

    def __call__(self, features: list[dict[str, Any]]) -> Batch:
        rows = [list(f[name]) for f in features for name in ("input_ids", "rejected_input_ids")]
        width = self.width or max(len(row) for row in rows)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple

        def sides(values: list[list[int]], fill: int) -> torch.Tensor:
            return torch.tensor([row + [fill] * (width - len(row)) for row in values]).view(len(features), 2, width)

        batch = {"input_ids": sides(rows, self.pad_token_id),
                 "attention_mask": sides([[1] * len(row) for row in rows], 0),
                 "margin": torch.tensor([float(f["margin"]) for f in features])}
        if self.targets:
            labels = [next_token_targets(list(f[name])) for f in features for name in ("labels", "rejected_labels")]
            batch["pair_targets"] = sides(labels, IGNORE)
        return batch


def pair_collator(pad_token_id: int, precision: str, padding: str, max_length: int, targets: bool) -> PairCollator:
    multiple = 8 if precision != "fp32" else None  # tensor-core shapes under mixed precision
    return PairCollator(pad_token_id, multiple, max_length if padding == "max_length" else None, targets)


class PairTask(Task):
    """What the reward model and DPO share: pair rows, both answers of a pair in one batch, a pair as the loss item."""

    sequences_per_example = 2
    trains_tokens: bool = False
    """The batches carry next-token targets of the answers (DPO), not only their tokens (a reward model)."""

    @classmethod
    def columns(cls, recipe: Recipe) -> list[str]:
        return pair_columns(recipe.task)

    def collators(self) -> tuple[Collator, Collator]:
        data = self.recipe.data
        collate = pair_collator(self.tokenizer.pad_token_id, self.recipe.training.precision, data.padding,
                                data.max_length, targets=self.trains_tokens)
        return collate, collate

    def loss_items(self, batch: Batch, counted: torch.Tensor) -> int:
        return int(counted.sum())
