"""The rows predictions are made for, checked as training checks them, and the files predictions and metrics go
to, written to a temporary file and renamed into place so an error or a kill never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import datasets

from launcher.data.sources import FILE_BUILDERS, load_file as load_data_file
from launcher.serve.trained import PredictError
from launcher.tasks.base import PredictingTask


def read_input(path: str, evaluate: bool, task: PredictingTask) -> datasets.Dataset:
    """The input rows, with what the task reads (and, to evaluate, its targets) checked as training checks them."""
    dataset = load_data_file(path)
    task.check_input(dataset, path, evaluate)
    return dataset


def output_rows(dataset: datasets.Dataset, columns: dict[str, list], path: Path) -> datasets.Dataset:
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    if path.suffix.lower() == ".csv":  # CSV has no lists: `a|b`
        lists = [name for name, feature in dataset.features.items() if isinstance(feature, (datasets.List, datasets.Sequence))]
        if lists:
            dataset = dataset.map(lambda row: {name: "|".join(map(str, row[name] or [])) for name in lists})
    return dataset


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it once the writer succeeded (removed if it failed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_rows(dataset: datasets.Dataset, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise PredictError(f"--output {path}: use one of {', '.join(FILE_BUILDERS)}")
    with written_atomically(path) as temporary:
        if suffix == ".csv":
            dataset.to_csv(temporary, index=False)
        elif suffix == ".parquet":
            dataset.to_parquet(temporary)
        else:
            dataset.to_json(temporary, lines=suffix == ".jsonl", force_ascii=False)


def write_text(text: str, path: Path) -> None:
    with written_atomically(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
