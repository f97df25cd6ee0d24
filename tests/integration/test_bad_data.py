"""Bad data never crashes silently: each problem is a one-line error naming the file and, where a column is at
fault, the column; the run exits 1 before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, BertConfig, T5Config

from builders import FILLER, sentiment_rows, write_csv
from recipes import tiny_recipe, write_recipe
from runs import run_in_process
from launcher.model.loading import sequence_limits


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


def write_latin1(path: Path) -> Path:
    """Two reviews in Latin-1, the second holding è (byte 0xe8, which UTF-8 never has before an ASCII letter)."""
    rows = [{"text": "good film", "label": 1}, {"text": "très mauvais film", "label": 0}]
    if path.suffix == ".parquet":  # Arrow refuses to build such strings: put the bytes in as they are
        raw = pa.array([row["text"].encode("latin-1") for row in rows], pa.binary())
        texts = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())
        pq.write_table(pa.table({"text": texts, "label": [row["label"] for row in rows]}), path)
    elif path.suffix == ".csv":
        path.write_bytes("text,label\n".encode() + "".join(f"{r['text']},{r['label']}\n" for r in rows).encode("latin-1"))
    elif path.suffix == ".json":
        path.write_bytes(json.dumps(rows, ensure_ascii=False).encode("latin-1"))
    else:
        path.write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("latin-1"))
    return path


@pytest.mark.parametrize("suffix, where", [
    (".csv", "line 3"), (".jsonl", "line 2"), (".json", "line 1"), (".parquet", "column 'text' row 1"),
])
def test_text_that_is_not_utf8_gets_one_message_in_every_format(assets, tmp_path, capsys, suffix, where):
    """JSON lines used to load and then crash with a UnicodeDecodeError at tokenization, parquet too; JSON said
    something else than CSV."""
    path = write_latin1(tmp_path / f"train{suffix}")
    error = run_with(assets, tmp_path, capsys, path)
    assert error == f"error: {path}: not UTF-8 text ({where}: byte 0xe8); re-encode it as UTF-8"


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


@pytest.mark.parametrize("labels", [[1, 0, None, 1, 0, 1, 0, 1], ["fresh", "rotten", None] + ["fresh", "rotten"] * 2 + ["fresh"]],
                         ids=["ids", "names"])
def test_a_blank_label_cell_is_named_by_its_row(assets, tmp_path, capsys, labels):
    """A blank cell made pandas read the ids as floats ("holds float64", no row named) or crashed the names' sort."""
    rows = [{**row, "label": "" if label is None else label} for row, label in zip(sentiment_rows(8, seed=0), labels)]
    path = write_csv(tmp_path / "train.csv", rows)
    error = run_with(assets, tmp_path, capsys, path)
    assert error.endswith(f"{path}: column 'label' is blank in row(s) [2]; every example needs a label"), error


def test_max_length_beyond_the_models_positions_is_refused_by_check_and_by_the_run(assets, tmp_path, capsys):
    """The tiny BERT has 128 positions: a 162-token review used to pass --check and crash the run in the
    embeddings ("The size of tensor a (162) must match the size of tensor b (128)")."""
    rows = sentiment_rows(8, seed=0)
    rows[0]["text"] = " ".join(FILLER[i % len(FILLER)] for i in range(160)) + " good"
    recipe = tiny_recipe(assets, tmp_path / "run", data={"train_file": str(write_csv(tmp_path / "long.csv", rows)),
                                                         "max_length": 200})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    for flags in (["--check"], []):
        assert run_in_process(path, *flags) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: data.max_length 200 is longer than the model takes ({assets['bert']}: "
                          "max_position_embeddings 128, tokenizer model_max_length 128); set data.max_length to 128 or less"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sequence_limits_skip_what_does_not_limit(assets):
    """No position table (T5's relative positions) and transformers' "no limit" tokenizer sentinel (1e30) limit
    nothing; RoBERTa's tokenizer says 2 less than its table (the first rows belong to the padding)."""
    class Tokenizer:
        def __init__(self, model_max_length):
            self.model_max_length = model_max_length

    unlimited = Tokenizer(int(1e30))
    assert sequence_limits(T5Config(), unlimited) == {}
    assert sequence_limits(BertConfig(max_position_embeddings=514), unlimited) == {"max_position_embeddings": 514}
    assert sequence_limits(BertConfig(max_position_embeddings=514), Tokenizer(512)) == {
        "max_position_embeddings": 514, "tokenizer model_max_length": 512}
    assert sequence_limits(T5Config(), AutoTokenizer.from_pretrained(assets["bert"])) == {"tokenizer model_max_length": 128}
