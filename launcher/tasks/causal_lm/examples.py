"""How a causal_lm recipe's rows become examples: each row rendered as text with its trained spans
(`launcher.tasks.causal_lm.rendering`), tokenized, shortened or dropped to fit `data.max_length`; labelled rows
also carry their class and, for evaluation, every class's answer after the same prompt.

`ExampleBuilder` is built once from the recipe, the tokenizer and the label names, and returns what it finds
(notes, how labelled eval rows are scored) with the rows instead of keeping it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from launcher.data.labels import LabelSpace, class_id
from launcher.data.preparation import MapPlan
from launcher.data.sources import DataError
from launcher.recipe.schema import Recipe
from launcher.tasks.causal_lm.rendering import Fitted, Rendered, TextRenderer, Tokenized, check_messages, fit_texts, tokenize


@dataclass
class Examples:
    """One split's examples and what building them found."""

    dataset: datasets.Dataset
    notes: list[str] = field(default_factory=list)
    class_tokens: Optional[list[int]] = None
    """Labelled eval: each class's single answer token, when every answer is one token after the same prompt
    (one forward per example then scores every class); None otherwise."""


def text_in(row: dict[str, Any], field: str, where: str) -> str:
    """The row's text in `field`, or a DataError naming the row and the column."""
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: column {field!r} is empty or not text")
    return value


def single_answer_tokens(candidates: list[Tokenized]) -> Optional[list[int]]:
    """Each candidate's answer token when every answer is exactly one token after one shared prompt, else None."""
    first = candidates[0]
    if any(c.answer is None or c.answer[1] - c.answer[0] != 1 or c.answer[0] != first.answer[0]
           or c.input_ids[:c.answer[0]] != first.input_ids[:first.answer[0]] for c in candidates):
        return None
    return [c.input_ids[c.answer[0]] for c in candidates]




class ExampleBuilder:
    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, labels: Optional[LabelSpace]):
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.labels = labels
        """Labelled rows' classes in id order (None for the other formats)."""
        self.renderer = TextRenderer(recipe.task, tokenizer)

    @property
    def labelled(self) -> bool:
        return self.recipe.task.format == "labelled"

    def answers(self) -> list[str]:
        return self.recipe.task.label_words or self.labels.names

    def render(self, row: dict[str, Any], where: str) -> Rendered:
        """One row as text; a labelled row with its gold answer and its text shortened as its evaluation does."""
        task = self.recipe.task
        if task.format == "chat":
            return self.renderer.chat(check_messages(row[task.messages_field], where))
        if task.format == "prompt_completion":
            prompt, completion = text_in(row, task.prompt_field, where), text_in(row, task.completion_field, where)
            return self.renderer.prompt_answer(prompt, completion, answer_span=False)
        return self.fit(row, where, self.answers()).rendered[self.class_of(row, where)]

    def fit(self, row: dict[str, Any], where: str, answers: list[str]) -> Fitted:
        """A labelled row rendered with each of `answers` after one prompt, its text shortened (`task.shorten`) so
        that the longest fits `data.max_length`."""
        data, template = self.recipe.data, self.recipe.task.prompt_template
        texts = {"text": text_in(row, data.text_field, where)}
        if data.text_pair_field:
            texts["text_pair"] = text_in(row, data.text_pair_field, where)

        def render(filled: dict[str, str]) -> list[Rendered]:
            return [self.renderer.prompt_answer(template.format(**filled), answer, answer_span=True) for answer in answers]

        return fit_texts(texts, render, self.tokenizer, data.max_length, self.recipe.task.shorten)

    def class_of(self, row: dict[str, Any], where: str) -> int:
        label = row[self.recipe.data.label_field]
        index = class_id(label, self.labels)
        if index is None:
            raise DataError(f"{where}: column {self.recipe.data.label_field!r} holds {label!r}, which has no label "
                            f"word (task.label_words has {len(self.answers())} in id order)")
        return index

    def generation_prompts(self, dataset: datasets.Dataset, origin: str) -> list[dict[str, str]]:
        """The first `task.generations` eval rows' prompts, each with what the data answers."""
        prompts = []
        for i in range(min(self.recipe.task.generations, len(dataset))):
            rendered = self.render(dataset[i], f"{origin} row {i}")
            prompts.append({"prompt": self.renderer.prompt_of(rendered), "reference": rendered.text[rendered.trained[-1][0]:]})
        return prompts

    def tokenize_split(self, dataset: datasets.Dataset, origin: str, evaluation: bool, map_plan: MapPlan) -> Examples:
        max_length = self.recipe.data.max_length
        choices = evaluation and self.labelled

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            encoded = [self.encode_row(row, f"{origin} row {index}", max_length, choices) for index, row in zip(indices, rows)]
            return {column: [values[column] for values in encoded] for column in encoded[0]}

        tokenized = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                                desc=f"tokenizing {origin}", **map_plan.options(origin, "tokenized", len(dataset)))
        shortened = self.shortened_note(tokenized, origin)
        tokenized, dropped = self.drop_truncated(tokenized.remove_columns("shortened"), origin, map_plan)
        examples = self.choose_scoring(tokenized) if choices else Examples(tokenized)
        examples.notes[:0] = [note for note in (shortened, dropped) if note]
        return examples

    def encode_row(self, row: dict[str, Any], where: str, max_length: int, choices: bool) -> dict[str, Any]:
        """One row's columns. Labelled rows carry their class; with `choices`, every class's candidate after the
        row's one (shortened) prompt, the gold row being its own class's candidate. A training row's text is cut
        to leave room for the longest answer too, as at evaluation: were it cut by its own answer's length, where
        the text ends would tell the label."""
        if not self.labelled:
            gold = tokenize(self.render(row, where), self.tokenizer, max_length)
            return {"input_ids": gold.input_ids, "labels": gold.labels, "truncated": gold.truncated, "shortened": False}
        class_index = self.class_of(row, where)
        fitted = self.fit(row, where, self.answers())
        gold = fitted.tokenized[class_index]
        columns = {"input_ids": gold.input_ids, "labels": gold.labels, "class_id": class_index,
                   "truncated": not fitted.fits, "shortened": fitted.shortened}
        if not choices:
            return columns
        candidates = fitted.tokenized
        return columns | {
            "choice_input_ids": [c.input_ids for c in candidates],
            "choice_labels": [c.labels for c in candidates],
            "choice_answers": [c.answer or (len(c.input_ids), len(c.input_ids)) for c in candidates],
            "answer_at": gold.answer[0] if gold.answer else -1,
            "class_tokens": single_answer_tokens(candidates),
        }

    def shortened_note(self, tokenized: datasets.Dataset, origin: str) -> Optional[str]:
        """How many kept rows were shortened (a row that does not fit even shortened is dropped, not counted)."""
        kept = ~np.asarray(tokenized["truncated"], dtype=bool)
        shortened = int(np.count_nonzero(np.asarray(tokenized["shortened"], dtype=bool) & kept))
        if not shortened:
            return None
        side = self.recipe.task.shorten
        return (f"{origin}: shortened the text of {shortened} of {len(tokenized)} rows at its {side} to fit "
                f"data.max_length={self.recipe.data.max_length} with the instruction and the whole answer "
                f"(task.shorten={side})")

    def choose_scoring(self, tokenized: datasets.Dataset) -> Examples:
        """One forward per example when every row's answers are the same single tokens, else one per class."""
        per_row = tokenized["class_tokens"]
        if per_row and all(tokens == per_row[0] for tokens in per_row) and per_row[0] is not None:
            return Examples(tokenized.remove_columns(["choice_input_ids", "choice_labels", "choice_answers", "class_tokens"]),
                            ["answers are single tokens after the same prompt: one forward per eval example scores them all"],
                            class_tokens=per_row[0])
        return Examples(tokenized.remove_columns(["answer_at", "class_tokens"]),
                        [f"answers span several tokens: eval scores each of the {len(self.answers())} per example"])

    def drop_truncated(self, tokenized: datasets.Dataset, origin: str, map_plan: MapPlan) -> tuple[datasets.Dataset, Optional[str]]:
        """The rows that fit `data.max_length`, and a note when some did not (`task.on_truncated=fail`: an error)."""
        truncated = [i for i, cut in enumerate(tokenized["truncated"]) if cut]
        max_length = self.recipe.data.max_length
        if self.labelled:
            why = f"do not fit data.max_length={max_length}: the prompt template and the longest answer alone leave no room for their text"
        else:
            why = f"lose every trained token to data.max_length={max_length}"
        if truncated and self.recipe.task.on_truncated == "fail":
            raise DataError(f"{origin}: rows {truncated[:10]} {why}; raise data.max_length or set task.on_truncated=drop")
        note = None
        if truncated:
            note = f"{origin}: dropped {len(truncated)} of {len(tokenized)} rows that {why} (task.on_truncated=drop)"
            tokenized = tokenized.filter(lambda cut: not cut, input_columns="truncated",
                                         **map_plan.options(origin, "kept", len(tokenized)))
        if len(tokenized) == 0:
            raise DataError(f"{origin}: no rows left to train on")
        return tokenized.remove_columns("truncated"), note
