"""Preference rows as pairs of token sequences: one prompt, then the chosen and then the rejected answer.

A row holds text (a prompt and two answers) or chat messages (prompt turns and two assistant continuations,
possibly as whole conversations repeating the prompt's turns); either is rendered as the SFT formats are
(`launcher.tasks.causal_lm.rendering`), so a reward model and a DPO policy see exactly the text a chat model
would, and only the answers are trained. A pair too long for `data.max_length` has its prompt shortened, never its
answers (`task.shorten`), and is dropped only when the answers alone do not fit. Every bad row is a `DataError`
naming the file, the row and the column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from launcher.data.preparation import MapPlan
from launcher.data.sources import DataError, Splits
from launcher.recipe.schema import PreferenceTask, Recipe
from launcher.tasks.causal_lm.rendering import Fitted, Rendered, TextRenderer, check_messages, fit_texts

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Pair:
    """One row read: a text prompt with text answers, or prompt turns with assistant turns."""

    prompt: str | Messages
    answers: tuple[str | Messages, ...]
    """(chosen, rejected); one answer where predict scores single answers."""
    margin: float


@dataclass
class PairSplit:
    """One split's tokenized pairs and what building them found."""

    dataset: datasets.Dataset
    notes: list[str] = field(default_factory=list)


def pair_columns(task: PreferenceTask) -> list[str]:
    return [name for name in (task.prompt_field, task.chosen_field, task.rejected_field, task.margin_field) if name]


def shared_start(first: str, second: str) -> str:
    """The longest common beginning of two texts, cut back to a whitespace so that no word is split."""
    length = 0
    while length < min(len(first), len(second)) and first[length] == second[length]:
        length += 1
    if length < len(first) and length < len(second) and not first[length - 1:length].isspace():
        length = max(first.rfind(" ", 0, length), first.rfind("\n", 0, length)) + 1
    return first[:length]


class PairReader:
    """Rows to `Pair`s for one recipe: which columns, text or chat, where the prompt ends."""

    def __init__(self, task: PreferenceTask):
        self.task = task

    def read(self, row: dict[str, Any], where: str, fields: Optional[tuple[str, ...]] = None) -> Pair:
        """The row's prompt and answers (`fields`: the answer columns, by default chosen and rejected; predict
        scores a file of single answers too)."""
        task = self.task
        fields = fields or (task.chosen_field, task.rejected_field)
        answers = [self.answer(row, name, where) for name in fields]
        if len({type(answer) for answer in answers}) > 1:
            raise DataError(f"{where}: columns {' and '.join(map(repr, fields))} must both be text or both be chat messages")
        if len(answers) == 2 and answers[0] == answers[1]:
            raise DataError(f"{where}: columns {' and '.join(map(repr, fields))} are identical; a pair needs two "
                            "different answers")
        prompt = self.prompt(row, answers, where)
        if isinstance(answers[0], list):
            prompt_turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            answers = [self.continuation(prompt_turns, turns, name, where) for turns, name in zip(answers, fields)]
            prompt = prompt_turns
        elif isinstance(prompt, list):
            answers = [[{"role": "assistant", "content": text}] for text in answers]
        return Pair(prompt, tuple(answers), self.margin(row, where))

    def answer(self, row: dict[str, Any], name: str, where: str) -> str | Messages:
        value = row[name]
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"{where}: column {name!r} is empty")
            return value
        if isinstance(value, list) and value:
            return check_messages_only(value, f"{where}: column {name!r}")
        raise DataError(f"{where}: column {name!r} is empty or neither text nor a list of chat messages")

    def prompt(self, row: dict[str, Any], answers: list[str | Messages], where: str) -> str | Messages:
        """The row's prompt column, or (`prompt_field: null`) the beginning both answers share."""
        name = self.task.prompt_field
        if name is None:
            shared = None
            if len(answers) == 2:  # a single answer (predict) shares nothing with anything
                first, second = answers
                shared = common_turns(first, second) if isinstance(first, list) else shared_start(first, second)
            if not shared:
                raise DataError(f"{where}: task.prompt_field is null but the answers share no beginning to take as "
                                "the prompt")
            return shared
        value = row[name]
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value:
            return check_messages_only(value, f"{where}: column {name!r}")
        raise DataError(f"{where}: column {name!r} is empty or neither text nor a list of chat messages")

    def continuation(self, prompt: Messages, turns: Messages, name: str, where: str) -> Messages:
        """The assistant turns after the prompt: a conversation repeating the prompt's turns is read from their end."""
        if turns[:len(prompt)] == prompt:
            turns = turns[len(prompt):]
        if not turns or turns[0]["role"] != "assistant":
            raise DataError(f"{where}: column {name!r} must continue the prompt with an assistant turn")
        return turns

    def margin(self, row: dict[str, Any], where: str) -> float:
        name = self.task.margin_field
        if name is None or name not in row:  # training checked the column is there; predict's input may lack it
            return 0.0
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{where}: column {name!r} must be a finite number, got {value!r}")
        return float(value)


def check_messages_only(value: list, where: str) -> Messages:
    """Chat messages as `check_messages` checks them, without its need for an assistant turn (a prompt has none)."""
    return check_messages(value + [{"role": "assistant", "content": "-"}], where)[:-1]


def common_turns(chosen: Messages, rejected: Messages) -> Messages:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared]


class PairBuilder:
    """Pairs rendered, shortened to fit and tokenized: `input_ids` / `labels` of the chosen answer,
    `rejected_input_ids` / `rejected_labels` of the other (labels: the answer's tokens, IGNORE elsewhere), `margin`."""

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase):
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.reader = PairReader(recipe.task)
        self.renderer = TextRenderer(recipe.task, tokenizer)

    def fit(self, pair: Pair, where: str) -> Fitted:
        """Both answers after one prompt, the prompt shortened (`task.shorten`) so that the longer fits."""
        if isinstance(pair.prompt, list):
            if not self.renderer.has_template:
                raise DataError(f"{where}: chat messages need a chat template; the tokenizer of "
                                f"{self.tokenizer.name_or_path} has none (give task.chat_template)")
            texts = {str(turn): message["content"] for turn, message in enumerate(pair.prompt)}

            def render(contents: dict[str, str]) -> list[Rendered]:
                prompt = [message | {"content": contents[str(turn)]} for turn, message in enumerate(pair.prompt)]
                earlier = sum(message["role"] == "assistant" for message in prompt)
                return [replace(rendered, trained=rendered.trained[earlier:])  # the prompt's own turns are not trained
                        for rendered in (self.renderer.chat(prompt + answer) for answer in pair.answers)]
        else:
            texts = {"prompt": pair.prompt}

            def render(contents: dict[str, str]) -> list[Rendered]:
                return [self.renderer.prompt_answer(contents["prompt"], answer, answer_span=False) for answer in pair.answers]

        return fit_texts(texts, render, self.tokenizer, self.recipe.data.max_length, self.recipe.task.shorten)

    def encode_row(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        pair = self.reader.read(row, where)
        fitted = self.fit(pair, where)
        chosen, rejected = fitted.tokenized
        return {"input_ids": chosen.input_ids, "labels": chosen.labels, "rejected_input_ids": rejected.input_ids,
                "rejected_labels": rejected.labels, "margin": pair.margin, "truncated": not fitted.fits,
                "shortened": fitted.shortened}

    def tokenize_split(self, dataset: datasets.Dataset, origin: str, map_plan: MapPlan) -> PairSplit:
        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            encoded = [self.encode_row(row, f"{origin} row {index}") for index, row in zip(indices, rows)]
            return {column: [values[column] for values in encoded] for column in encoded[0]}

        tokenized = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                                desc=f"tokenizing {origin}", **map_plan.options(origin, "tokenized", len(dataset)))
        truncated = np.asarray(tokenized["truncated"], dtype=bool)
        shortened = int(np.count_nonzero(np.asarray(tokenized["shortened"], dtype=bool) & ~truncated))
        max_length, side = self.recipe.data.max_length, self.recipe.task.shorten
        notes = []
        if shortened:
            notes.append(f"{origin}: shortened the prompt of {shortened} of {len(tokenized)} pairs at its {side} to fit "
                         f"data.max_length={max_length} with both whole answers (task.shorten={side})")
        if truncated.any():
            rows = np.flatnonzero(truncated)
            why = f"answers do not fit data.max_length={max_length} even after a one-token prompt"
            if self.recipe.task.on_truncated == "fail":
                raise DataError(f"{origin}: rows {rows[:10].tolist()}: {why}; raise data.max_length or set "
                                "task.on_truncated=drop")
            notes.append(f"{origin}: dropped {len(rows)} of {len(tokenized)} pairs whose {why} (task.on_truncated=drop)")
            tokenized = tokenized.filter(lambda cut: not cut, input_columns="truncated",
                                         **map_plan.options(origin, "kept", len(tokenized)))
        if len(tokenized) == 0:
            raise DataError(f"{origin}: no pairs left to train on")
        return PairSplit(tokenized.remove_columns(["truncated", "shortened"]), notes)

    def generation_prompts(self, dataset: datasets.Dataset, origin: str, count: int) -> tuple[list[dict[str, str]], bool]:
        """The first `count` eval pairs' prompts as generation starts, with both answers as rendered; and whether
        they are plain text (no chat template: the tokenizer adds its BOS when a generation starts)."""
        prompts, plain = [], False
        for index in range(min(count, len(dataset))):
            chosen, rejected = self.fit(self.reader.read(dataset[index], f"{origin} row {index}"), origin).rendered
            start, plain = chosen.trained[0][0], chosen.plain
            prompts.append({"prompt": chosen.text[:start], "chosen": chosen.text[start:],
                            "rejected": rejected.text[rejected.trained[0][0]:]})
        return prompts, plain


def pair_splits(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> tuple[PairBuilder, PairSplit, Optional[PairSplit]]:
    """The builder and both splits' tokenized pairs."""
    builder = PairBuilder(recipe, tokenizer)
    train = builder.tokenize_split(splits.train, splits.train_origin, splits.map_plan)
    evaluation = (builder.tokenize_split(splits.eval, splits.eval_origin, splits.map_plan)
                  if splits.eval is not None else None)
    return builder, train, evaluation
