"""Bad data never crashes silently: each problem is a one-line error naming the file and, where a column is at
fault, the column; the run exits 1 before any model is loaded."""

from __future__ import annotations

import pytest

from builders import sentiment_rows, write_csv
from conftest import run_in_process, tiny_recipe, write_recipe


def run_with(assets, tmp_path, capsys, train_file, **data) -> str:
    recipe = tiny_recipe(assets, tmp_path / "run", data={"train_file": str(train_file), **data})
    assert run_in_process(write_recipe(tmp_path / "recipe.yaml", recipe)) == 1
    output = capsys.readouterr().err
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors, output[-2000:]
    return errors[0]


def rows_without(column: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != column} for row in sentiment_rows(8, seed=0)]


def test_missing_column(assets, tmp_path, capsys):
    path = write_csv(tmp_path / "train.csv", rows_without("label"))
    error = run_with(assets, tmp_path, capsys, path)
    assert str(path) in error and "missing column(s) ['label']" in error


def test_label_out_of_range(assets, tmp_path, capsys):
    rows = sentiment_rows(8, seed=0)
    rows[3]["label"] = 7
    path = write_csv(tmp_path / "train.csv", rows)
    error = run_with(assets, tmp_path, capsys, path)
    assert str(path) in error and "column 'label'" in error and "[7]" in error


def test_non_integer_labels(assets, tmp_path, capsys):
    rows = [{**row, "label": row["label"] + 0.5} for row in sentiment_rows(8, seed=0)]
    path = write_csv(tmp_path / "train.csv", rows)
    error = run_with(assets, tmp_path, capsys, path)
    assert str(path) in error and "column 'label'" in error


@pytest.mark.parametrize("content", ["", "idx,text,label\n"], ids=["zero_bytes", "header_only"])
def test_empty_file(assets, tmp_path, capsys, content):
    path = tmp_path / "train.csv"
    path.write_text(content)
    error = run_with(assets, tmp_path, capsys, path)
    assert str(path) in error


def test_unreadable_file(assets, tmp_path, capsys):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"\x00\x01 not a parquet file \xff" * 10)
    error = run_with(assets, tmp_path, capsys, path)
    assert str(path) in error and "cannot be read as parquet" in error


def test_wrong_encoding(assets, tmp_path, capsys):
    path = tmp_path / "train.csv"
    path.write_bytes("idx,text,label\n0,très bon film,1\n1,mauvais,0\n".encode("latin-1"))
    error = run_with(assets, tmp_path, capsys, path)
    assert str(path) in error and "utf-8" in error.lower()


def test_unknown_string_label_in_eval_file_names_the_eval_file(assets, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", [{"text": "good film", "label": "fresh"}, {"text": "bad", "label": "rotten"}])
    evaluation = write_csv(tmp_path / "eval.csv", [{"text": "good", "label": "fresh"}, {"text": "meh", "label": "stale"}])
    error = run_with(assets, tmp_path, capsys, train, eval_file=str(evaluation), label_names=["rotten", "fresh"])
    assert "'stale'" in error and "column 'label'" in error
    assert str(evaluation) in error, "the label comes from the eval file, but the error names another file"


def test_empty_text_cell(assets, tmp_path, capsys):
    rows = sentiment_rows(8, seed=0)
    rows[2]["text"] = ""
    path = write_csv(tmp_path / "train.csv", rows)
    error = run_with(assets, tmp_path, capsys, path)
    assert str(path) in error and "column 'text'" in error
