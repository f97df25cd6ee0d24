"""Rows of the three SFT formats as text with the character spans to train on, then as tokens with targets.

Every format becomes one `Rendered`: the full text, the spans whose tokens are trained (assistant turns, the
completion, the answer and its end-of-turn marker) and, for labelled rows, the span of the answer word(s) alone,
which restricted-choice evaluation scores. Rendering the whole conversation once and mapping spans to tokens by
their character offsets keeps the tokens exactly those of the full text (tokenizing pieces separately can merge
differently at the seams). A labelled row's text that is too long for `data.max_length` is shortened before it is
rendered (`fit_texts`), so that the instruction and the whole answer always fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from transformers import PreTrainedTokenizerBase

from launcher.data.sources import DataError
from launcher.recipe.schema import CausalLMTask, PreferenceTask

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the target of a token that is not trained (PyTorch's cross-entropy ignore_index)
FIT_ATTEMPTS = 8  # tokens can merge differently where a text is cut: the fit is re-measured, the budget shrinks


@dataclass(frozen=True)
class Rendered:
    text: str
    trained: list[tuple[int, int]]
    answer: Optional[tuple[int, int]] = None
    plain: bool = False
    """Plain text (no chat template): the tokenizer adds its BOS, and EOS is appended and trained."""


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A conversation as the chat format expects it, or a DataError naming the row and what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}}, got {type(messages).__name__}")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise DataError(f"{where}: message {turn} is not a {{role, content}} mapping: {str(message)[:80]}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {turn} has unknown role {message['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise DataError(f"{where}: message {turn} ({message['role']}) has empty or non-text content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class TextRenderer:
    """Turns rows into `Rendered` text for one recipe and tokenizer."""

    def __init__(self, task: CausalLMTask | PreferenceTask, tokenizer: PreTrainedTokenizerBase):
        self.task = task
        self.tokenizer = tokenizer
        if task.chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = task.chat_template
        self.has_template = bool(tokenizer.chat_template)
        if task.format == "chat" and not self.has_template:
            raise DataError(f"task.format chat: the tokenizer of {tokenizer.name_or_path} has no chat template; "
                            "give one in task.chat_template")

    def template(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def chat(self, messages: list[dict[str, str]], answer_span: bool = False) -> Rendered:
        """The conversation with every assistant turn trained (its content and the template's end-of-turn marker).

        A turn's span is what rendering it adds after the generation prompt; templates that do not render a
        conversation's beginning the same with and without its later turns cannot be trained this way."""
        text = self.template(messages)
        trained, answer = [], None
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.template(messages[:turn], generation_prompt=True)
            through = self.template(messages[: turn + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError("the chat template renders a conversation's start differently once later turns are "
                                "added; the assistant turns cannot be located (give task.chat_template)")
            end = len(before) + len(through[len(before):].rstrip())
            trained.append((len(before), end))
            content_at = text.find(message["content"], len(before))  # a template may trim or rewrite the content
            answer = (content_at, content_at + len(message["content"])) if content_at >= 0 else trained[-1]
        return Rendered(text, trained, answer if answer_span else None)

    def prompt_answer(self, prompt: str, answer: str, answer_span: bool) -> Rendered:
        """A prompt and its answer: as a user and an assistant turn, or joined as plain text (answer + EOS trained)."""
        if self.task.use_chat_template and self.has_template:
            system = [{"role": "system", "content": self.task.system_prompt}] if self.task.system_prompt else []
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            return self.chat(system + turns, answer_span)
        separator = " " if self.task.format == "labelled" and not prompt[-1:].isspace() else ""
        start = len(prompt) + len(separator)
        text = prompt + separator + answer
        return Rendered(text, [(start, len(text))], (start, len(text)) if answer_span else None, plain=True)

    def prompt_of(self, rendered: Rendered) -> str:
        """The text a generation starts from: everything before the last trained span."""
        return rendered.text[: rendered.trained[-1][0]]


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    """`input_ids` where trained, IGNORE elsewhere (not yet shifted to next-token targets)."""
    answer: Optional[tuple[int, int]]
    """Token range of the answer word(s), when asked for and not cut."""
    truncated: bool
    """`max_length` cut away every trained token, or part of the answer asked for."""


def tokenize(rendered: Rendered, tokenizer: PreTrainedTokenizerBase, max_length: Optional[int]) -> Tokenized:
    """Tokens of the full text, trained where a token overlaps a trained span, cut to `max_length` (None: uncut)."""
    encoded = tokenizer(rendered.text, add_special_tokens=rendered.plain, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])

    def inside(spans: list[tuple[int, int]], start: int, end: int) -> bool:
        return any(start < span_end and end > span_start for span_start, span_end in spans)

    labels = [token if inside(rendered.trained, *offset) else IGNORE for token, offset in zip(ids, offsets)]
    if rendered.plain:  # the model learns to stop where the completion ends
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        offsets.append((len(rendered.text), len(rendered.text)))
    answer = None
    if rendered.answer is not None:
        positions = [i for i, offset in enumerate(offsets) if inside([rendered.answer], *offset)]
        answer = (positions[0], positions[-1] + 1) if positions else None
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
        answer = answer if answer is not None and answer[1] <= max_length else None
    lost_answer = rendered.answer is not None and answer is None
    return Tokenized(ids, labels, answer, truncated=lost_answer or all(label == IGNORE for label in labels))


@dataclass(frozen=True)
class Fitted:
    """A labelled row's texts as they are trained and scored, with every rendering of them."""

    texts: dict[str, str]
    rendered: list[Rendered]
    tokenized: list[Tokenized]
    """One per rendering, uncut."""
    shortened: bool
    fits: bool
    """Every rendering is at most `max_length` tokens. False: the template and the answer leave no room for one
    token of each text (the shortest attempt is kept, for the caller to drop or refuse)."""


def token_spans(text: str, tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    return list(tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])


def split_budget(lengths: list[int], budget: int) -> list[int]:
    """How many of its tokens each text keeps of `budget` in all: the longest is shortened first, down to the next
    one's length, then both alike (shortest texts served first, each at most an equal share of what is left)."""
    keep = [0] * len(lengths)
    left = budget
    for served, index in enumerate(sorted(range(len(lengths)), key=lambda i: lengths[i])):
        keep[index] = min(lengths[index], left // (len(lengths) - served))
        left -= keep[index]
    return keep


def cut(text: str, spans: list[tuple[int, int]], keep: int, side: Literal["end", "start"]) -> str:
    """`text` down to `keep` of its tokens (`spans`), cut at its end or its start, at a token boundary."""
    if keep >= len(spans):
        return text
    if side == "end":
        return text[:spans[keep - 1][1]].rstrip()
    return text[spans[len(spans) - keep][0]:].lstrip()


def fit_texts(texts: dict[str, str], render: Callable[[dict[str, str]], list[Rendered]],
              tokenizer: PreTrainedTokenizerBase, max_length: int, side: Literal["end", "start"]) -> Fitted:
    """`texts` (a template's `{text}`, `{text_pair}`) shortened where needed so that every rendering `render` makes
    of them fits `max_length` tokens whole.

    The texts' budget is `max_length` less everything else in the longest rendering (template, answer, end marker,
    special tokens); a pair splits it with `split_budget`. The fit is measured on the full renderings, since tokens
    can merge differently at a cut and inside the template, and the budget shrinks by what is still over."""
    rendered = render(texts)
    tokenized = [tokenize(r, tokenizer, None) for r in rendered]
    over = max(len(t.input_ids) for t in tokenized) - max_length
    if over <= 0:
        return Fitted(texts, rendered, tokenized, shortened=False, fits=True)
    spans = {name: token_spans(text, tokenizer) for name, text in texts.items()}
    budget = sum(len(s) for s in spans.values()) - over
    for _ in range(FIT_ATTEMPTS):
        keep = split_budget([len(s) for s in spans.values()], max(budget, len(texts)))
        shortened = {name: cut(texts[name], spans[name], k, side) for name, k in zip(texts, keep)}
        rendered = render(shortened)
        tokenized = [tokenize(r, tokenizer, None) for r in rendered]
        over = max(len(t.input_ids) for t in tokenized) - max_length
        if over <= 0 or budget <= len(texts):
            return Fitted(shortened, rendered, tokenized, shortened=True, fits=over <= 0)
        budget = min(budget - 1, sum(keep) - over)
    return Fitted(shortened, rendered, tokenized, shortened=True, fits=False)
