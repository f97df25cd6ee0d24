"""Labelled texts (and pairs) as token ids truncated to `data.max_length`, with the task's label
encoding in a `labels` column.
"""

from __future__ import annotations

from typing import Optional

import datasets
from transformers import PreTrainedTokenizerBase

from launcher.data.labels import LabelEncoder
from launcher.data.sources import DataError, Splits
from launcher.recipe.schema import DataSection


def tokenize_texts(batch: dict, data: DataSection, tokenizer: PreTrainedTokenizerBase, padding: bool) -> dict:
    """A batch of rows' texts (and pairs) as token ids truncated to `data.max_length`; with `padding`, padded to
    it as `data.padding: max_length` asks (training batches), else left for the collator to pad."""
    pair = batch[data.text_pair_field] if data.text_pair_field else None
    return tokenizer(batch[data.text_field], pair, truncation=True, max_length=data.max_length,
                     padding="max_length" if padding and data.padding == "max_length" else False)


def tokenize_splits(splits: Splits, data: DataSection, tokenizer: PreTrainedTokenizerBase, encode_labels: LabelEncoder) -> Splits:
    """Batched, cached `map`: input ids truncated to `max_length`, the task's label encoding in a `labels` column."""
    text_fields = [data.text_field] + ([data.text_pair_field] if data.text_pair_field else [])

    def encode(batch: dict, indices: list[int], origin: str) -> dict:
        check_texts(batch, text_fields, indices, origin)
        encoded = tokenize_texts(batch, data, tokenizer, padding=True)
        encoded["labels"] = encode_labels(batch, indices, origin)
        return encoded

    def tokenize(dataset: Optional[datasets.Dataset], origin: str) -> Optional[datasets.Dataset]:
        if dataset is None:
            return None
        return dataset.map(
            encode, batched=True, with_indices=True, fn_kwargs={"origin": origin},
            remove_columns=dataset.column_names, desc=f"tokenizing {origin}",
            **splits.map_plan.options(origin, "tokenized", len(dataset)),
        )

    return Splits(
        tokenize(splits.train, splits.train_origin),
        tokenize(splits.eval, splits.eval_origin),
        splits.train_origin,
        splits.eval_origin,
    )


def check_texts(batch: dict, fields: list[str], indices: list[int], origin: str) -> None:
    """Every row of `fields` holds non-empty text, or a DataError names the column and rows."""
    for field in fields:
        bad = [i for i, text in zip(indices, batch[field]) if not isinstance(text, str) or not text]
        if bad:
            raise DataError(f"{origin}: column {field!r} is empty or not text in row(s) {bad[:10]}")
