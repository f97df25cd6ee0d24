"""Data: file formats, columns, label mapping, pairs, seeded subsets, tokenization, collator, sampler."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from launcher.data.labels import class_id_encoder, labelled_text_columns, resolve_labels
from launcher.data.loaders import build_dataloaders
from launcher.data.sampling import EpochShuffleSampler
from launcher.data.sources import DataError, load_splits
from launcher.recipe.schema import DataSection, Recipe
from launcher.tasks.sequence_classification.batches import build_collator
from launcher.tasks.sequence_classification.single_label import SequenceClassification
from launcher.tasks.sequence_classification.tokenization import tokenize_splits
from builders import sentiment_rows, write_csv


def section(**values) -> DataSection:
    return DataSection(**values)


def load(data: DataSection):
    return load_splits(data, labelled_text_columns(data))


def recipe_with(assets, tmp_path, precision="fp32", **data) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": str(assets["bert"])},
        "data": {"train_file": str(assets["train_csv"]), "eval_file": str(assets["eval_csv"]), **data},
        "task": {"num_labels": 2},
        "training": {"precision": precision, "per_device_batch_size": 4},
        "output": {"dir": str(tmp_path)},
    })


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_local_formats_load(tmp_path, suffix):
    rows = sentiment_rows(10, seed=0)
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        write_csv(path, rows)
    elif suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        lines = [json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    splits = load(section(train_file=str(path)))
    assert len(splits.train) == 10 and splits.eval is None
    assert set(splits.train.column_names) >= {"text", "label"}


def test_seeded_subset_is_the_tutorials_shuffle_select(assets):
    import datasets

    splits = load(section(train_file=str(assets["train_csv"]), train_samples=10, subset_seed=7))
    expected = datasets.load_dataset("csv", data_files=str(assets["train_csv"]), split="train").shuffle(seed=7).select(range(10))
    assert splits.train["idx"] == expected["idx"]
    again = load(section(train_file=str(assets["train_csv"]), train_samples=10, subset_seed=7))
    assert again.train["idx"] == splits.train["idx"]


def test_eval_fraction_carves_a_disjoint_seeded_eval_set(assets):
    splits = load(section(train_file=str(assets["train_csv"]), eval_fraction=0.25))
    assert len(splits.eval) == 16 and len(splits.train) == 48
    assert not set(splits.train["idx"]) & set(splits.eval["idx"])


def test_subset_larger_than_split_is_an_error_naming_it(assets):
    with pytest.raises(DataError, match=r"train.csv: asked for a subset of 999 examples but it holds only 64"):
        load(section(train_file=str(assets["train_csv"]), train_samples=999))


def test_missing_column_names_file_and_columns(assets):
    with pytest.raises(DataError, match=r"eval.csv: missing column\(s\) \['sentence'\]"):
        load(section(train_file=str(assets["eval_csv"]), eval_file=str(assets["eval_csv"]), text_field="sentence"))


def test_missing_file_unsupported_type_empty_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load(section(train_file=str(tmp_path / "nope.csv")))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load(section(train_file=str(tmp_path / "data.txt")))
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="empty.csv: no examples"):
        load(section(train_file=str(tmp_path / "empty.csv")))
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl: cannot be read as json"):
        load(section(train_file=str(tmp_path / "broken.jsonl")))


def test_string_labels_map_to_ids_in_label_names_order(tmp_path):
    rows = [{"text": f"t{i}", "label": ("fresh", "rotten")[i % 2]} for i in range(6)]
    path = write_csv(tmp_path / "s.csv", rows)
    splits = load(section(train_file=str(path)))
    assert resolve_labels(splits, section(train_file=str(path)), 2).names == ["fresh", "rotten"]
    fixed = section(train_file=str(path), label_names=["rotten", "fresh"])
    assert resolve_labels(splits, fixed, 2).label2id == {"rotten": 0, "fresh": 1}


def test_label_problems_are_named(tmp_path, assets):
    path = write_csv(tmp_path / "s.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "z"}])
    with pytest.raises(DataError, match=r"s.csv: column 'label' has 3 classes"):
        resolve_labels(load(section(train_file=str(path))), section(train_file=str(path)), 2)
    with pytest.raises(DataError, match=r"labels \['z'\] not in data.label_names"):
        data = section(train_file=str(path), label_names=["x", "y"])
        resolve_labels(load(data), data, 2)


def test_integer_labels_out_of_range_are_named(tmp_path, assets):
    path = write_csv(tmp_path / "ints.csv", [{"text": "good film", "label": i} for i in (0, 1, 5)])
    data = section(train_file=str(path))
    splits = load(data)
    labels = resolve_labels(splits, data, 2)
    tokenizer = AutoTokenizer.from_pretrained(assets["bert"])
    with pytest.raises(DataError, match=r"ints.csv: column 'label' has labels \[5\] in row\(s\) \[2\] that are neither a class name"):
        tokenize_splits(splits, data, tokenizer, class_id_encoder(data, labels))


def test_pairs_are_encoded_as_one_sequence_with_two_segments(assets):
    data = section(train_file=str(assets["pair_train_csv"]), text_field="sentence1", text_pair_field="sentence2")
    splits = load(data)
    tokenizer = AutoTokenizer.from_pretrained(assets["bert"])
    tokenized = tokenize_splits(splits, data, tokenizer, class_id_encoder(data, resolve_labels(splits, data, 2))).train
    first = tokenized[0]
    assert first["input_ids"].count(tokenizer.sep_token_id) == 2
    assert set(first["token_type_ids"]) == {0, 1}
    expected = tokenizer(splits.train[0]["sentence1"], splits.train[0]["sentence2"])["input_ids"]
    assert first["input_ids"] == expected


def test_truncation_and_max_length_padding(assets, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(assets["bert"])
    for padding, check in (("max_length", lambda n: n == {8}), ("dynamic", lambda n: max(n) <= 8 and len(n) > 1)):
        data = section(train_file=str(assets["train_csv"]), max_length=8, padding=padding)
        splits = load(data)
        tokenized = tokenize_splits(splits, data, tokenizer, class_id_encoder(data, resolve_labels(splits, data, 2))).train
        assert check({len(ids) for ids in tokenized["input_ids"]}), padding


@pytest.mark.parametrize("precision, multiple", [("fp32", 1), ("bf16", 8)])
def test_dynamic_padding_pads_each_batch_to_its_longest(assets, tmp_path, precision, multiple):
    recipe = recipe_with(assets, tmp_path, precision=precision)
    tokenizer = AutoTokenizer.from_pretrained(assets["bert"])
    splits = load(recipe.data)
    prepared = SequenceClassification.prepare(recipe, tokenizer, splits)
    train_loader, eval_loader = build_dataloaders(prepared.data, recipe, *prepared.task.collators())
    widths = set()
    for batch in eval_loader:
        longest = int(batch["attention_mask"].sum(dim=1).max())
        width = batch["input_ids"].shape[1]
        assert width == -(-longest // multiple) * multiple
        widths.add(width)
    if multiple == 1:
        assert len(widths) > 1, "batches of different longest members should get different widths"
    assert build_collator(tokenizer, recipe).pad_to_multiple_of == (8 if precision == "bf16" else None)


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3, batch_size=4), EpochShuffleSampler(50, seed=3, batch_size=4)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(999)  # global RNG state must not matter (ranks and resumed runs differ there)
    assert list(b) == first and sorted(first) == list(range(50))
    a.set_epoch(1)
    assert list(a) != first


def test_length_grouped_sampler_reduces_padding():
    lengths = [(i * 37) % 100 + 1 for i in range(400)]
    grouped = list(EpochShuffleSampler(400, seed=0, batch_size=8, lengths=lengths))
    shuffled = list(EpochShuffleSampler(400, seed=0, batch_size=8))
    assert sorted(grouped) == list(range(400))

    def padded(order):
        return sum(max(lengths[i] for i in order[k:k + 8]) * 8 for k in range(0, 400, 8))

    assert padded(grouped) < 0.7 * padded(shuffled)


def test_length_grouped_batches_come_in_random_order():
    """No length curriculum: transformers' grouping alone runs each megabatch's batches longest to shortest."""
    lengths = [(i * 37) % 100 + 1 for i in range(403)]  # 403 = 50 batches of 8 and a short one of 3
    order = list(EpochShuffleSampler(403, seed=0, batch_size=8, lengths=lengths))
    assert sorted(order) == list(range(403))
    batches = [order[start:start + 8] for start in range(0, 403, 8)]
    assert max(lengths) in [lengths[i] for i in batches[0]]  # an out-of-memory shows at the first step
    assert len(batches[-1]) == 3  # the loader cuts batches from the order: a short one must stay last
    longest = [max(lengths[i] for i in batch) for batch in batches[1:-1]]
    descents = sum(a > b for a, b in zip(longest, longest[1:])) / (len(longest) - 1)
    assert 0.3 < descents < 0.7, f"{descents:.0%} of consecutive batches get shorter"
