"""Classification batches: dynamically padded, or packed into one row (`data.padding: packed`)."""

from __future__ import annotations

import itertools

import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from launcher.data.sources import DataError
from launcher.recipe.schema import Recipe


def build_collator(tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> DataCollatorWithPadding:
    """Dynamic padding; a multiple of 8 under mixed precision keeps tensor-core shapes."""
    multiple = 8 if recipe.training.precision != "fp32" else None
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)


class PackedCollator:
    """`data.padding: packed`: a batch's examples joined into one row of `input_ids`, with no padding at all.

    `position_ids` restart at 0 with each example: given no attention mask, transformers' decoders read that as
    packed sequences and let each example attend only to itself (a block-diagonal causal mask under sdpa and eager,
    variable-length kernels under flash_attention_2). `classify_at` is each example's last token that is not the pad
    token: the one the model's own head picks in a padded batch, so training classifies where the exported model will.

    The row is not filled up to a multiple of 8 under mixed precision: its length only sets how many rows the matrix
    products have (the hidden sizes, which tensor cores want aligned, stay as they are), it changes every batch
    anyway, and a filler segment would spend attention and MLP work on tokens that teach nothing.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        examples = [list(f["input_ids"]) for f in features]
        if not all(examples):
            raise DataError("an example tokenized to no tokens at all; a packed batch cannot hold it (data.padding=dynamic can)")
        starts = itertools.accumulate((len(ids) for ids in examples[:-1]), initial=0)
        return {
            "input_ids": torch.tensor([list(itertools.chain(*examples))]),
            "position_ids": torch.tensor([[p for ids in examples for p in range(len(ids))]]),
            "classify_at": torch.tensor([start + self.last_real_token(ids) for start, ids in zip(starts, examples)]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    def last_real_token(self, ids: list[int]) -> int:
        """transformers' rule for decoder classifiers: the rightmost token that is not the pad token, else the first."""
        return max((i for i, token in enumerate(ids) if token != self.pad_token_id), default=0)
