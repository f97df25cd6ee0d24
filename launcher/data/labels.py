"""The label space of labelled rows: class names in id order, worked out from the data or the recipe, and how
a row's label becomes a class id.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import datasets
import pyarrow.compute as pc

from launcher.data.sources import DataError, Splits
from launcher.recipe.schema import DataSection


@dataclass
class LabelSpace:
    """Class names in id order; the model's `id2label` / `label2id` come from here."""

    names: list[str]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def check_labels_present(dataset: datasets.Dataset, origin: str, field: str) -> None:
    """No blank label cell. A CSV reader reads a blank cell as missing, which turns a column of ids into floats (NaN)
    and a column of names into names and None; either way the fault is the rows', so name them."""
    blank = pc.indices_nonzero(pc.is_null(dataset.with_format("arrow")[field], nan_is_null=True)).to_pylist()
    if blank:
        raise DataError(f"{origin}: column {field!r} is blank in row(s) {blank[:10]}; every example needs a label")


def labelled_text_columns(data: DataSection) -> list[str]:
    """The columns of a labelled-text dataset: text (and its pair) and the label (or the 0/1 label columns)."""
    texts = [data.text_field] + ([data.text_pair_field] if data.text_pair_field else [])
    return texts + (data.label_columns or [data.label_field])


def resolve_labels(splits: Splits, data: DataSection, num_labels: Optional[int], per_row_lists: bool = False) -> LabelSpace:
    """Work out the class names; string labels get ids (stored in `id2label`), integer ids are range-checked.
    `num_labels` is what the recipe says there are (None: as many as the data names). `per_row_lists`: each row
    holds a list of labels (multi_label), whose elements are read as above."""
    for dataset, origin in ((splits.train, splits.train_origin), (splits.eval, splits.eval_origin)):
        if dataset is not None:
            check_labels_present(dataset, origin, data.label_field)
    feature = splits.train.features[data.label_field]
    if per_row_lists:
        if not isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
            raise DataError(f"{splits.train_origin}: column {data.label_field!r} holds {feature}; multi_label wants a list "
                            "of class names or ids per row (json, jsonl, parquet), or one 0/1 column per class "
                            "(data.label_columns)")
        feature = feature.feature
    if isinstance(feature, datasets.ClassLabel):
        names = data.label_names or feature.names
    elif feature.dtype in ("string", "large_string"):
        labelled = [(dataset, origin) for dataset, origin in ((splits.train, splits.train_origin), (splits.eval, splits.eval_origin)) if dataset is not None]
        flatten = itertools.chain.from_iterable if per_row_lists else iter
        seen_by_origin = {origin: set(flatten(dataset[data.label_field])) for dataset, origin in labelled}
        names = data.label_names or sorted(set().union(*seen_by_origin.values()))
        for origin, seen in seen_by_origin.items():
            unknown = sorted(seen - set(names), key=str)
            if unknown:
                raise DataError(f"{origin}: column {data.label_field!r} has labels {unknown} not in data.label_names")
    elif feature.dtype.startswith("int"):
        if data.label_names is None and num_labels is None:
            raise DataError(f"{splits.train_origin}: column {data.label_field!r} holds integer ids; name the classes "
                            "in id order with task.label_words (or data.label_names)")
        names = data.label_names or [f"LABEL_{i}" for i in range(num_labels)]
    else:
        raise DataError(f"{splits.train_origin}: column {data.label_field!r} holds {feature.dtype}; labels must be integers or strings")
    if num_labels is not None and len(names) != num_labels:
        raise DataError(
            f"{splits.train_origin}: column {data.label_field!r} has {len(names)} classes {names[:10]} "
            f"but the recipe gives {num_labels} (task.num_labels or task.label_words)"
        )
    return LabelSpace(list(names))


LabelEncoder = Callable[[dict, list[int], str], list]
"""(a batch of raw rows, their row numbers, the split's origin) -> the batch's `labels`, or a DataError naming rows."""


def class_id(label: Any, labels: LabelSpace) -> Optional[int]:
    """A label (name or integer id) as a class id; None when it names no class."""
    index = labels.label2id.get(label) if isinstance(label, str) else label
    return index if isinstance(index, int) and 0 <= index < len(labels.names) else None


def class_id_encoder(data: DataSection, labels: LabelSpace) -> LabelEncoder:
    """single_label: each row's label (a name or an id) as its class id."""
    def encode(batch: dict, indices: list[int], origin: str) -> list[int]:
        ids = [class_id(label, labels) for label in batch[data.label_field]]
        bad = [(row, label) for row, label, index in zip(indices, batch[data.label_field], ids) if index is None]
        if bad:
            raise DataError(f"{origin}: column {data.label_field!r} has labels {sorted({label for _, label in bad}, key=str)[:10]} "
                            f"in row(s) {[row for row, _ in bad][:10]} that are neither a class name "
                            f"{labels.names[:10]} nor an id in [0, {len(labels.names)})")
        return ids
    return encode
