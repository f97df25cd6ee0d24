"""Labelled causal_lm rows longer than `data.max_length`: the row's text is shortened so that the instruction and
the whole answer fit (the end of the text is cut by default, `task.shorten: start` cuts its start), a text pair
shortens the longer text first, every restricted-choice candidate of a row shares one shortened prompt, and a row is
dropped (or refused) only when the template and answer alone do not fit; half an answer is never trained. The
labelled training order keeps the class mix under `data.group_by_length`. Chat and prompt_completion rows that are
too long are cut and dropped as before, without crashing."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest

from builders import FILLER, NEGATIVE, POSITIVE, write_jsonl
from recipes import tiny_recipe, write_recipe
from runs import REPO, run_in_process
from launcher.data.loaders import build_dataloaders
from launcher.data.sources import DataError
from launcher.model.loading import load_tokenizer
from launcher.recipe.loading import RecipeError, load_recipe
from launcher.recipe.schema import Recipe
from launcher.tasks import prepare_task
from launcher.tasks.base import Prepared
from launcher.tasks.causal_lm.rendering import IGNORE

MAX_LENGTH = 32
# The tiny chat template around a labelled row: <|user|> review TEXT verdict <|end|> <|assistant|> ANSWER <|end|>
# ("review" and "verdict" are one <unk> each): 6 tokens besides the text and the answer.
AROUND = 6


def review(rng: random.Random, words: int, positive: bool) -> str:
    """`words` vocabulary words (one token each), sentiment words among filler."""
    pool = POSITIVE if positive else NEGATIVE
    return " ".join(rng.choice(pool) if rng.random() < 0.3 else rng.choice(FILLER) for _ in range(words))


def review_rows(n: int, seed: int, shortest: int = 4, longest: int = 80) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        rows.append({"text": review(rng, rng.randint(shortest, longest), positive), "label": int(positive)})
    return rows


def labelled_recipe(assets, tmp_path: Path, train: list[dict], eval_rows: list[dict] | None = None, **sections) -> dict:
    """The tiny chat Llama answering `bad` / `good` after `review {text} verdict`; `sections` merge over it."""
    data = {"train_file": str(write_jsonl(tmp_path / "train.jsonl", train)), "text_field": "text",
            "max_length": MAX_LENGTH,
            "eval_file": str(write_jsonl(tmp_path / "eval.jsonl", eval_rows)) if eval_rows else None}
    recipe = tiny_recipe(assets, tmp_path / "out", model="chat_llama", data=data,
                         training={"epochs": 1, "per_device_batch_size": 4}, evaluation={"metrics": ["accuracy"]})
    recipe["task"] = {"type": "causal_lm", "format": "labelled", "prompt_template": "review {text} verdict",
                      "label_words": ["bad", "good"], "generations": 1, "max_new_tokens": 2}
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def prepare(raw: dict) -> Prepared:
    recipe = Recipe.model_validate(raw)
    return prepare_task(recipe, load_tokenizer(recipe.model))


def ids_of(task, text: str) -> list[int]:
    return task.tokenizer.convert_tokens_to_ids(text.split())


def trained_text(task, labels: list[int]) -> str:
    return task.tokenizer.decode([t for t in labels if t != IGNORE])


def notes_with(result: Prepared, word: str) -> list[str]:
    return [note for note in result.notes if word in note]


@pytest.mark.parametrize("on_truncated", ["drop", "fail"])
def test_over_long_texts_are_shortened_so_that_instruction_and_answer_fit(assets, tmp_path, on_truncated):
    """Single-token answers (one forward scores both): before, the answer span was located on the uncut text and
    the eval crashed with IndexError; rows of train lost their answer and were dropped (or refused)."""
    train, evaluation = review_rows(24, seed=0), review_rows(12, seed=1)
    result = prepare(labelled_recipe(assets, tmp_path, train, evaluation, task={"on_truncated": on_truncated}))
    task, splits = result.task, result.data
    assert (len(splits.train), len(splits.eval)) == (len(train), len(evaluation))
    budget = MAX_LENGTH - AROUND - 1
    for row, example in zip(train, splits.train):
        words = row["text"].split()
        assert len(example["input_ids"]) == AROUND + 1 + min(len(words), budget)
        assert example["input_ids"][2:-5] == ids_of(task, " ".join(words[:budget]))  # the end of the text is cut
        assert trained_text(task, example["labels"]) == ("good" if row["label"] else "bad") + " <|end|>"
    assert task.class_tokens == ids_of(task, "bad good")
    long_train = sum(len(row["text"].split()) > budget for row in train)
    long_eval = sum(len(row["text"].split()) > budget for row in evaluation)
    assert 0 < long_train < len(train) and long_eval > 0
    shortened = notes_with(result, "shortened")
    assert len(shortened) == 2 and f"{long_train} of {len(train)}" in shortened[0] and f"{long_eval} of {len(evaluation)}" in shortened[1]
    assert not notes_with(result, "dropped")


def test_shorten_start_keeps_the_end_of_the_text(assets, tmp_path):
    train = review_rows(8, seed=2, shortest=40)
    result = prepare(labelled_recipe(assets, tmp_path, train, task={"shorten": "start"}))
    task, splits = result.task, result.data
    budget = MAX_LENGTH - AROUND - 1
    for row, example in zip(train, splits.train):
        assert example["input_ids"][2:-5] == ids_of(task, " ".join(row["text"].split()[-budget:]))
    assert "task.shorten=start" in notes_with(result, "shortened")[0]


def test_every_candidate_of_a_row_shares_one_shortened_prompt_and_keeps_its_whole_answer(assets, tmp_path):
    """Answers of 2 and 4 tokens: the text's budget leaves room for the longest, so each candidate differs from the
    others only in its answer, and the gold row is its own candidate."""
    evaluation = review_rows(10, seed=3, shortest=30)
    raw = labelled_recipe(assets, tmp_path, review_rows(8, seed=4), evaluation,
                          task={"label_words": ["bad film", "very very good film"]})
    result = prepare(raw)
    task, splits = result.task, result.data
    assert len(splits.eval) == len(evaluation) and task.class_tokens is None
    budget = MAX_LENGTH - AROUND - 4
    for row, example in zip(evaluation, splits.eval):
        candidates, spans = example["choice_input_ids"], example["choice_answers"]
        prompts = [ids[:start] for ids, (start, _) in zip(candidates, spans)]
        assert all(prompt == prompts[0] for prompt in prompts)
        assert prompts[0][2:-3] == ids_of(task, " ".join(row["text"].split()[:budget]))
        assert [ids[start:end] for ids, (start, end) in zip(candidates, spans)] == [ids_of(task, "bad film"), ids_of(task, "very very good film")]
        assert max(len(ids) for ids in candidates) == MAX_LENGTH
        assert example["input_ids"] == candidates[example["class_id"]]


def test_a_text_pair_shortens_the_longer_text_first(assets, tmp_path):
    rng = random.Random(5)
    rows = [{"text": review(rng, 5, True), "pair": review(rng, 60, True), "label": 1},   # the pair alone is cut
            {"text": review(rng, 50, False), "pair": review(rng, 50, False), "label": 0}]  # both, to equal shares
    raw = labelled_recipe(assets, tmp_path, rows, data={"text_pair_field": "pair"},
                          task={"prompt_template": "review {text} verdict {text_pair} verdict"})
    result = prepare(raw)
    task, splits = result.task, result.data
    budget = MAX_LENGTH - AROUND - 1 - 1  # one more <unk> between the texts
    kept = []
    for row, example in zip(rows, splits.train):
        ids = example["input_ids"]
        middle = ids.index(task.tokenizer.unk_token_id, 2)
        first, second = ids[2:middle], ids[middle + 1:-5]
        assert first == ids_of(task, row["text"])[:len(first)] and second == ids_of(task, row["pair"])[:len(second)]
        kept.append((len(first), len(second)))
    assert kept == [(5, budget - 5), (budget // 2, budget - budget // 2)]


@pytest.mark.parametrize("on_truncated", ["drop", "fail"])
def test_a_template_and_longest_answer_that_fill_max_length_leave_no_row_and_never_half_an_answer(assets, tmp_path, on_truncated):
    """max_length 10 is the template and the 4-token answer alone: no text fits beside them, in any row (a row's
    text is cut to the same length whatever its label, or where it ends would tell the label). One more token
    keeps every row, each with its whole answer. Before, the cut went through that answer and the rows whose answer
    it cut were dropped."""
    rng = random.Random(6)
    rows = [{"text": review(rng, 3 if i < 4 else 6, i % 2 == 0), "label": i % 2} for i in range(8)]
    raw = labelled_recipe(assets, tmp_path, rows, data={"max_length": 10},
                          task={"label_words": ["bad", "very very good film"], "on_truncated": on_truncated})
    refused = re.escape("rows [0, 1, 2, 3, 4, 5, 6, 7]") + ".*longest answer alone" if on_truncated == "fail" else "no rows left"
    with pytest.raises(DataError, match=refused):
        prepare(raw)
    raw["data"]["max_length"] = 11
    result = prepare(raw)
    task, splits = result.task, result.data
    assert [trained_text(task, example["labels"]) for example in splits.train] == [
        "very very good film <|end|>" if row["label"] else "bad <|end|>" for row in rows]
    assert [len(example["input_ids"]) for example in splits.train] == [11 if row["label"] else 8 for row in rows]
    assert "shortened the text of 8 of 8 rows" in notes_with(result, "shortened")[0]
    assert not notes_with(result, "dropped")


def test_check_and_run_on_over_long_reviews(assets, tmp_path, capsys):
    """What the review found: `--check` and the run crashed (IndexError) on over-long rows."""
    recipe = write_recipe(tmp_path / "r.yaml", labelled_recipe(assets, tmp_path, review_rows(16, seed=7), review_rows(8, seed=8)))
    assert run_in_process(recipe, "--check") == 0
    assert "shortened" in capsys.readouterr().out
    assert run_in_process(recipe) == 0
    generation = (tmp_path / "out" / "generations" / "step-00000000.jsonl").read_text().splitlines()[0]
    assert len(json.loads(generation)["prompt"].split()) <= MAX_LENGTH - 2  # one token a word; the answer fits after it


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion"])
def test_chat_and_prompt_completion_rows_too_long_are_cut_or_dropped_as_before(assets, tmp_path, fmt, capsys):
    rng = random.Random(9)
    rows = []
    for i in range(12):
        prompt, completion = review(rng, 40 if i % 3 == 0 else 6, True), review(rng, 40 if i % 3 == 1 else 3, True)
        rows.append({"prompt": prompt, "completion": " " + completion,
                     "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    raw = labelled_recipe(assets, tmp_path, rows, rows, evaluation={"metrics": []},
                          task={"format": fmt, "prompt_template": None, "label_words": None,
                                **({"use_chat_template": False} if fmt == "prompt_completion" else {})})
    result = prepare(raw)
    splits = result.data
    assert len(splits.train) == 8  # the 4 over-long prompts lose every trained token; long completions are cut
    assert all(len(example["input_ids"]) <= MAX_LENGTH for example in splits.train)
    assert "dropped 4 of 12 rows" in notes_with(result, "dropped")[0]
    assert run_in_process(write_recipe(tmp_path / "r.yaml", raw), "--check") == 0


def test_labelled_training_order_keeps_the_class_mix_under_length_grouping(assets, tmp_path):
    """A quarter of the rows are positive and longer: plain length grouping gathers them in the longest batches
    and leaves most batches without one; the labelled task's classes keep 2 of every 8."""
    rng = random.Random(10)
    rows = [{"text": review(rng, rng.randint(12, 18) if i % 4 == 0 else rng.randint(2, 6), i % 4 == 0), "label": int(i % 4 == 0)}
            for i in range(96)]
    raw = labelled_recipe(assets, tmp_path, rows, data={"group_by_length": True}, training={"per_device_batch_size": 8})
    recipe = Recipe.model_validate(raw)
    result = prepare_task(recipe, load_tokenizer(recipe.model))
    task, tokenized = result.task, result.data
    loader, _ = build_dataloaders(tokenized, recipe, *task.collators(), task.class_ids(tokenized.train))
    order = list(loader.sampler)
    positives = [sum(rows[i]["label"] for i in order[start:start + 8]) for start in range(0, len(order), 8)]
    assert positives == [2] * 12
    assert task.class_ids(tokenized.train).tolist() == [row["label"] for row in rows]


@pytest.mark.parametrize(
    ("task", "fragment"),
    [({"shorten": "middle"}, "task.shorten:"),
     ({"format": "chat", "prompt_template": None, "label_words": None, "shorten": "start"}, "shorten do(es) not apply to format 'chat'")],
)
def test_shorten_is_a_labelled_choice_of_end_or_start(assets, tmp_path, task, fragment):
    raw = labelled_recipe(assets, tmp_path, review_rows(4, seed=11), task=task)
    problems = pytest.raises(RecipeError, load_recipe, write_recipe(tmp_path / "r.yaml", raw)).value.problems
    assert any(fragment in p for p in problems), problems


SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
SNIPPETS = REPO / "data" / "rotten_tomatoes" / "train.csv"


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").is_file() or not SNIPPETS.is_file(),
                    reason="models/SmolLM2-135M-Instruct or data/rotten_tomatoes not built (scripts/setup.sh)")
@pytest.mark.parametrize("label_words", [["negative", "positive"], ["rotten", "fresh"]])  # 1 token each; rotten is 2
def test_real_smollm2_reviews_longer_than_max_length_keep_their_answer(tmp_path, label_words):
    """The demo's chat template and system prompt on reviews of 20 joined snippets (about 500 tokens) at
    max_length 128: every row is kept, fits, and each eval row's candidates share one prompt."""
    with SNIPPETS.open(encoding="utf-8") as handle:
        snippets = [row for row in csv.DictReader(handle) if row["label"] in ("fresh", "rotten")][:320]
    rows = [{"text": " ".join(s["text"] for s in snippets[i:i + 20]), "label": snippets[i]["label"]} for i in range(0, 320, 20)]
    data = {"train_file": str(write_jsonl(tmp_path / "train.jsonl", rows[:8])),
            "eval_file": str(write_jsonl(tmp_path / "eval.jsonl", rows[8:])),
            "label_names": ["rotten", "fresh"], "max_length": 128}
    raw = {"model": {"name_or_path": str(SMOLLM2)}, "data": data, "output": {"dir": str(tmp_path / "out")},
           "task": {"type": "causal_lm", "format": "labelled", "system_prompt": "Answer with one word.",
                    "prompt_template": "Rotten Tomatoes review: {text}\nIs this review fresh (positive) or rotten (negative)?",
                    "label_words": label_words}}
    result = prepare(raw)
    task, splits = result.task, result.data
    assert (len(splits.train), len(splits.eval)) == (8, 8)
    assert all(len(example["input_ids"]) <= 128 for example in [*splits.train, *splits.eval])
    assert all(trained_text(task, example["labels"]) in [f"{word}<|im_end|>" for word in label_words] for example in splits.train)
    assert "shortened the text of 8 of 8 rows" in notes_with(result, "shortened")[0]
    assert task.tokenizer.decode(splits.train[0]["input_ids"]).endswith(
        "Is this review fresh (positive) or rotten (negative)?<|im_end|>\n<|im_start|>assistant\n"
        f"{label_words[1] if rows[0]['label'] == 'fresh' else label_words[0]}<|im_end|>\n")
    if label_words[0] == "rotten":
        assert task.class_tokens is None
        for example in splits.eval:
            prompts = [ids[:start] for ids, (start, _) in zip(example["choice_input_ids"], example["choice_answers"])]
            assert all(prompt == prompts[0] for prompt in prompts) and max(map(len, example["choice_input_ids"])) <= 128
    else:
        assert task.class_tokens is not None
