"""Causal-LM batches: padded rows, packed rows (positions restarting per example), and the labelled evaluation's
rows with their answer positions marked. Targets are shifted within each example."""

from __future__ import annotations

import itertools
from typing import Any, Optional

import torch

from launcher.tasks.base import Batch
from launcher.tasks.causal_lm.rendering import IGNORE


def next_token_targets(labels: list[int]) -> list[int]:
    """Position t is trained to predict token t+1: shift within the example, so no target crosses into the next
    example of a packed row."""
    return labels[1:] + [IGNORE]


class PaddedSFTCollator:
    """Rows padded to the batch's longest (a multiple of `multiple`), targets shifted per example."""

    def __init__(self, pad_token_id: int, multiple: Optional[int]):
        self.pad_token_id = pad_token_id
        self.multiple = multiple

    def pad(self, rows: list[list[int]], value: int, width: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    def __call__(self, features: list[dict[str, Any]]) -> Batch:
        ids = [list(f["input_ids"]) for f in features]
        width = max(len(row) for row in ids)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        return {
            "input_ids": self.pad(ids, self.pad_token_id, width),
            "attention_mask": self.pad([[1] * len(row) for row in ids], 0, width),
            "targets": self.pad([next_token_targets(list(f["labels"])) for f in features], IGNORE, width),
        }


def packed_sft_batch(features: list[dict[str, Any]]) -> Batch:
    """`data.padding: packed`: the batch's examples joined into one row, positions restarting per example."""
    examples = [list(f["input_ids"]) for f in features]
    return {
        "input_ids": torch.tensor([list(itertools.chain(*examples))]),
        "position_ids": torch.tensor([[p for ids in examples for p in range(len(ids))]]),
        "targets": torch.tensor([[t for f in features for t in next_token_targets(list(f["labels"]))]]),
    }


class ChoiceCollator(PaddedSFTCollator):
    """Labelled evaluation batches. Besides the trained targets (for the eval loss of the gold rows) they mark the
    targets of the answer words, which are scored. Rows hold every example once per class, the class's answer in
    place of the gold one, unless every answer is one token after the same prompt: then the gold row alone gives
    every class's log-prob at the answer position (`CausalLanguageModeling.class_tokens`)."""

    def __call__(self, features: list[dict[str, Any]]) -> Batch:
        if "choice_input_ids" in features[0]:
            rows = [{"input_ids": ids, "labels": labels}
                    for f in features for ids, labels in zip(f["choice_input_ids"], f["choice_labels"])]
            spans = [span for f in features for span in f["choice_answers"]]
        else:
            rows, spans = features, [(f["answer_at"], f["answer_at"] + 1) for f in features]
        batch = super().__call__(rows)
        answer = torch.zeros_like(batch["targets"], dtype=torch.bool)
        for row, (start, end) in enumerate(spans):
            answer[row, start - 1:end - 1] = True  # target t predicts token t+1
        batch["answer_mask"] = answer
        batch["class_id"] = torch.tensor([f["class_id"] for f in features])
        return batch
