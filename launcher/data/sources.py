"""Where rows come from: a hub dataset (the users' path) or local csv / json / jsonl / parquet files (the
offline path), carved and subset as the recipe says. Every data problem is a `DataError` naming the file
or split and the column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import pyarrow as pa

from launcher.data.preparation import MapPlan
from launcher.recipe.schema import DataSection


FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """The data cannot be used as the recipe describes it."""


@dataclass
class Splits:
    """Raw (untokenized) train and eval sets, with where each came from for error messages."""

    train: datasets.Dataset
    eval: Optional[datasets.Dataset]
    train_origin: str
    eval_origin: str
    map_plan: MapPlan = field(default_factory=MapPlan)
    """How the task's `map` over these splits runs: where its results are cached, in how many processes."""


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
