"""Datasets in, tokenized train/eval sets and their DataLoaders out.

Sources are a hub dataset (the users' path) or local csv / json / jsonl / parquet files (the offline
path). Every data problem is a `DataError` naming the file or split and the column.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import get_length_grouped_indices

from launcher.recipe import DataSection, Recipe
from launcher.sampling import batches_in_random_order, label_mixed_length_grouped_order

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """The data cannot be used as the recipe describes it."""


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


@dataclass
class Splits:
    """Raw (untokenized) train and eval sets, with where each came from for error messages."""

    train: datasets.Dataset
    eval: Optional[datasets.Dataset]
    train_origin: str
    eval_origin: str


def load_splits(data: DataSection, columns: list[str]) -> Splits:
    """Load train and eval as the recipe says (source, eval split or carved fraction, seeded subsets), checking both
    hold the `columns` the task reads."""
    if data.train_file is not None:
        train = load_file(data.train_file)
        train_origin = data.train_file
        evaluation = load_file(data.eval_file) if data.eval_file else None
        eval_origin = data.eval_file or ""
    else:
        train = load_hub_split(data, data.train_split)
        train_origin = f"{data.dataset}[{data.train_split}]"
        evaluation = load_hub_split(data, data.eval_split) if data.eval_split else None
        eval_origin = f"{data.dataset}[{data.eval_split}]"
    if data.eval_fraction is not None:
        carved = train.train_test_split(test_size=data.eval_fraction, seed=data.subset_seed)
        train, evaluation = carved["train"], carved["test"]
        eval_origin = f"{train_origin} (held-out {data.eval_fraction:.0%})"
    train = seeded_subset(train, data.train_samples, data.subset_seed, train_origin)
    if evaluation is not None:
        evaluation = seeded_subset(evaluation, data.eval_samples, data.subset_seed, eval_origin)
    splits = Splits(train, evaluation, train_origin, eval_origin)
    check_columns(splits, columns)
    return splits


def load_file(path: str) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_BUILDERS)}")
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found (relative paths are taken from {Path.cwd()})")
    if Path(path).stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    if builder != "parquet":
        check_utf8_file(path)
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for unreadable files; all mean the same to the user
        chain = error_chain(err)
        if any(isinstance(e, ValueError) and "corresponds to no data" in str(e) for e in chain):  # header, no rows
            raise DataError(f"{path}: no examples") from err
        # datasets wraps the parser's error in a generic "error occurred while generating": show the parser's.
        raise DataError(f"{path}: cannot be read as {builder}: {chain[1] if len(chain) > 1 else err}") from err
    if builder == "parquet":
        check_utf8_columns(dataset, path)
    return dataset


def not_utf8(path: str, where: str, byte: int) -> DataError:
    return DataError(f"{path}: not UTF-8 text ({where}: byte {byte:#04x}); re-encode it as UTF-8")


def check_utf8_file(path: str) -> None:
    """A text file decodes as UTF-8, or a DataError names the line. The JSON readers would load Latin-1 and fail
    only when a string is read (a traceback from deep inside the tokenization), CSV with a message of its own;
    one pass in 1 MiB blocks keeps this cheap on a 650,000-row file."""
    lines_before, carry = 0, b""
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            block, carry = carry + chunk, b""
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as err:
                if chunk and err.reason == "unexpected end of data":  # a character cut by the block's end
                    block, carry = block[:err.start], block[err.start:]
                else:
                    line = lines_before + block.count(b"\n", 0, err.start) + 1
                    raise not_utf8(path, f"line {line}", block[err.start]) from err
            lines_before += block.count(b"\n")
            if not chunk:
                return


def check_utf8_columns(dataset: datasets.Dataset, path: str) -> None:
    """Every string of a parquet file is UTF-8 (Arrow keeps the bytes as written, Python decodes them only when a
    row is read), or a DataError names the column and row. Arrow validates whole columns; only a column that fails
    is read row by row to say where."""
    table = dataset.with_format("arrow")[:]
    for name, column in zip(table.column_names, table.columns):
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            for row, raw in enumerate(column.cast(pa.binary() if pa.types.is_string(column.type) else pa.large_binary()).to_pylist()):
                try:
                    raw is None or raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise not_utf8(path, f"column {name!r} row {row}", raw[err.start]) from err


def error_chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from or while handling, outermost first."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def load_hub_split(data: DataSection, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(data.dataset, data.dataset_config, split=split)
    except Exception as err:  # offline, unknown name, unknown split: say which and why
        raise DataError(
            f"dataset {data.dataset!r} (config {data.dataset_config!r}) split {split!r} cannot be loaded: {err}. "
            "Offline? Point data.train_file / data.eval_file at local files instead."
        ) from err


def seeded_subset(dataset: datasets.Dataset, size: Optional[int], seed: int, origin: str) -> datasets.Dataset:
    """The tutorials' `shuffle(seed).select(range(n))`."""
    if size is None:
        return dataset
    if size > len(dataset):
        raise DataError(f"{origin}: asked for a subset of {size} examples but it holds only {len(dataset)}")
    return dataset.shuffle(seed=seed).select(range(size))


def labelled_text_columns(data: DataSection) -> list[str]:
    """The columns of a labelled-text dataset: text (and its pair) and the label (or the 0/1 label columns)."""
    texts = [data.text_field] + ([data.text_pair_field] if data.text_pair_field else [])
    return texts + (data.label_columns or [data.label_field])


def check_columns(splits: Splits, wanted: list[str]) -> None:
    for dataset, origin in ((splits.train, splits.train_origin), (splits.eval, splits.eval_origin)):
        if dataset is not None:
            check_dataset_columns(dataset, origin, wanted)


def check_dataset_columns(dataset: datasets.Dataset, origin: str, wanted: list[str]) -> None:
    if len(dataset) == 0:
        raise DataError(f"{origin}: no examples")
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise DataError(f"{origin}: missing column(s) {missing}; it has {dataset.column_names}")


def check_labels_present(dataset: datasets.Dataset, origin: str, field: str) -> None:
    """No blank label cell. A CSV reader reads a blank cell as missing, which turns a column of ids into floats (NaN)
    and a column of names into names and None; either way the fault is the rows', so name them."""
    blank = pc.indices_nonzero(pc.is_null(dataset.with_format("arrow")[field], nan_is_null=True)).to_pylist()
    if blank:
        raise DataError(f"{origin}: column {field!r} is blank in row(s) {blank[:10]}; every example needs a label")


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


def tokenize_splits(splits: Splits, data: DataSection, tokenizer: PreTrainedTokenizerBase, encode_labels: LabelEncoder) -> Splits:
    """Batched, cached `map`: input ids truncated to `max_length`, the task's label encoding in a `labels` column."""
    text_fields = [data.text_field] + ([data.text_pair_field] if data.text_pair_field else [])

    def encode(batch: dict, indices: list[int], origin: str) -> dict:
        check_texts(batch, text_fields, indices, origin)
        pair = batch[data.text_pair_field] if data.text_pair_field else None
        encoded = tokenizer(
            batch[data.text_field],
            pair,
            truncation=True,
            max_length=data.max_length,
            padding="max_length" if data.padding == "max_length" else False,
        )
        encoded["labels"] = encode_labels(batch, indices, origin)
        return encoded

    def tokenize(dataset: Optional[datasets.Dataset], origin: str) -> Optional[datasets.Dataset]:
        if dataset is None:
            return None
        return dataset.map(
            encode, batched=True, with_indices=True, fn_kwargs={"origin": origin},
            remove_columns=dataset.column_names, desc=f"tokenizing {origin}",
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


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """Batches of similar lengths, in random order.

    transformers' grouping (the Trainer's `group_by_length`) shuffles, cuts the order into megabatches and sorts
    each by length, so its batches run from longest to shortest within every megabatch: the same length
    curriculum each epoch. On the demo that cost 0.03 accuracy after one epoch, averaged over seeds
    (docs/benchmarks.md), so the batches are shuffled as well. The batch holding the longest example stays first,
    so an out-of-memory shows at the first step, and a short last batch stays last, since the loader cuts batches
    from this order in runs of `batch_size`.
    """
    return batches_in_random_order(get_length_grouped_indices(lengths, batch_size, generator=generator), lengths,
                                   batch_size, generator)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch) alone, so every rank sees the same order and a resumed
    run replays it exactly. With `lengths`, batches group similar lengths (`length_grouped_order`); with `labels`
    too, every batch keeps the label mix (`launcher.sampling`: plain grouping sorts labels into separate batches
    wherever length predicts the label)."""

    def __init__(self, num_examples: int, seed: int, batch_size: int, lengths: Optional[list[int]] = None,
                 labels: Optional[list[int]] = None):
        self.num_examples = num_examples
        self.seed = seed
        self.batch_size = batch_size
        self.lengths = lengths
        self.labels = labels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.lengths is None:
            yield from torch.randperm(self.num_examples, generator=generator).tolist()
        elif self.labels is not None:
            yield from label_mixed_length_grouped_order(self.lengths, self.labels, self.batch_size, generator)
        else:
            yield from length_grouped_order(self.lengths, self.batch_size, generator)


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


def example_token_ids(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each example's tokens without padding, from a padded batch (rows and attention mask) or a packed one."""
    if "attention_mask" in batch:
        return [ids[row.bool()] for ids, row in zip(batch["input_ids"], batch["attention_mask"])]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    return list(batch["input_ids"][0].tensor_split(starts[1:]))


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many of the batch's tokens are not padding (a packed row has none)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel())


def build_dataloaders(tokenized: Splits, recipe: Recipe, train_collator, eval_collator,
                      class_ids: Optional[list[int]] = None) -> tuple[DataLoader, Optional[DataLoader]]:
    """Train and eval loaders with the task's collators; training batches come from `EpochShuffleSampler`, whose
    length grouping keeps the mix of `class_ids` (each training example's class, where the task has classes)."""
    batch_size = recipe.training.per_device_batch_size
    lengths = [len(ids) for ids in tokenized.train["input_ids"]] if recipe.data.group_by_length else None
    sampler = EpochShuffleSampler(len(tokenized.train), recipe.training.seed, batch_size, lengths,
                                  class_ids if recipe.data.group_by_length else None)
    train_loader = DataLoader(
        tokenized.train, batch_size=batch_size, sampler=sampler, collate_fn=train_collator, num_workers=recipe.data.num_workers
    )
    eval_loader = None
    if tokenized.eval is not None:
        eval_loader = DataLoader(
            tokenized.eval, batch_size=recipe.eval_batch_size, shuffle=False, collate_fn=eval_collator, num_workers=recipe.data.num_workers
        )
    return train_loader, eval_loader
