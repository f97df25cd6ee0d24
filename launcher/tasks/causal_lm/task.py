"""`task.type: causal_lm`: supervised fine-tuning (SFT) of a decoder's own LM head.

Rows become text with trained spans (`launcher.tasks.causal_lm.rendering`), then tokens whose next-token targets are IGNORE
wherever nothing is trained. The loss is the mean over the trained tokens, and the LM head runs on those tokens
only: logits are batch x length x vocab floats (128k vocab for Llama 3), and most positions (prompts, padding)
need none. Labelled rows are also evaluated as classification, by scoring each label's words after the prompt and
taking the most likely (restricted choice, as lm-eval-harness does; multi-token answers sum their log-probs).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import ModelOutput

from launcher.data.labels import LabelSpace, class_id, labelled_text_columns, resolve_labels
from launcher.data.sources import DataError, Splits
from launcher.model.forward_routes import add_forward_route
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Batch, Collator, Task
from launcher.tasks.causal_lm.rendering import IGNORE, Fitted, Rendered, TextRenderer, Tokenized, check_messages, fit_texts, tokenize
from launcher.tasks.metrics import compute_metrics


GENERATIONS = "generations"  # the run directory's folder of greedy generations, one file per evaluation


@dataclass
class TrainedTokenOutput(ModelOutput):
    """What the SFT forward returns instead of full logits."""

    loss: Optional[torch.Tensor] = None
    """Cross-entropy summed over the trained tokens (0 when there are none: a mean of nothing would be NaN)."""
    token_losses: Optional[torch.Tensor] = None
    """Cross-entropy of each trained token (fp32), in row-major order of `selected`."""
    logits: Optional[torch.Tensor] = None
    """The LM head's fp32 logits at the trained tokens only, in the same order."""
    selected: Optional[torch.Tensor] = None
    """Where the trained tokens are: a bool mask shaped like `input_ids`."""


def trained_token_forward(lm: PreTrainedModel, input_ids: torch.Tensor, targets: torch.Tensor,
                          attention_mask: Optional[torch.Tensor] = None,
                          position_ids: Optional[torch.Tensor] = None) -> TrainedTokenOutput:
    """The decoder over every token, the LM head over the trained ones only.

    Packed rows carry `position_ids` restarting per example and no mask, which transformers' decoders read as
    separate sequences (as in `launcher.tasks.sequence_classification.packing`); use_cache=False, or the cache would make them one sequence."""
    backbone = getattr(lm, lm.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    selected = targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[selected]).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)  # Gemma 2/3 squash logits before the softmax
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token_losses = F.cross_entropy(logits, targets[selected], reduction="none")
    return TrainedTokenOutput(loss=token_losses.sum(), token_losses=token_losses, logits=logits, selected=selected)


def enable_trained_token_batches(model: torch.nn.Module) -> None:
    """Let `model` take batches with `targets` (`trained_token_forward`); generation goes to its own forward."""
    add_forward_route(model, "targets", trained_token_forward)


def next_token_targets(labels: list[int]) -> list[int]:
    """Position t is trained to predict token t+1: shift within the example, so no target crosses into the next
    example of a packed row."""
    return labels[1:] + [IGNORE]


def counted_targets(batch: Batch, counted: torch.Tensor) -> torch.Tensor:
    """The batch's targets, IGNORE wherever an example does not count: a padded batch holds one example per row,
    a packed row its examples one after another (positions restart at 0 with each)."""
    targets = batch["targets"]
    counted = counted.to(targets.device)
    if "position_ids" in batch:
        keep = counted[(batch["position_ids"] == 0).cumsum(dim=-1) - 1]
    else:
        keep = counted[:, None].expand_as(targets)
    return torch.where(keep, targets, IGNORE)


class PaddedSFTCollator:
    """Rows padded to the batch's longest (a multiple of `multiple`), targets shifted per example."""

    def __init__(self, pad_token_id: int, multiple: Optional[int]):
        self.pad_token_id = pad_token_id
        self.multiple = multiple

    def pad(self, rows: list[list[int]], value: int, width: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    def __call__(self, features: list[dict[str, Any]]) -> Batch:
        ids = [list(f["input_ids"]) for f in features]
        width = max(len(row) for row in ids)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        return {
            "input_ids": self.pad(ids, self.pad_token_id, width),
            "attention_mask": self.pad([[1] * len(row) for row in ids], 0, width),
            "targets": self.pad([next_token_targets(list(f["labels"])) for f in features], IGNORE, width),
        }


def packed_sft_batch(features: list[dict[str, Any]]) -> Batch:
    """`data.padding: packed`: the batch's examples joined into one row, positions restarting per example."""
    examples = [list(f["input_ids"]) for f in features]
    return {
        "input_ids": torch.tensor([list(itertools.chain(*examples))]),
        "position_ids": torch.tensor([[p for ids in examples for p in range(len(ids))]]),
        "targets": torch.tensor([[t for f in features for t in next_token_targets(list(f["labels"]))]]),
    }


class ChoiceCollator(PaddedSFTCollator):
    """Labelled evaluation batches. Besides the trained targets (for the eval loss of the gold rows) they mark the
    targets of the answer words, which are scored. Rows hold every example once per class, the class's answer in
    place of the gold one, unless every answer is one token after the same prompt: then the gold row alone gives
    every class's log-prob at the answer position (`CausalLanguageModeling.class_tokens`)."""

    def __call__(self, features: list[dict[str, Any]]) -> Batch:
        if "choice_input_ids" in features[0]:
            rows = [{"input_ids": ids, "labels": labels}
                    for f in features for ids, labels in zip(f["choice_input_ids"], f["choice_labels"])]
            spans = [span for f in features for span in f["choice_answers"]]
        else:
            rows, spans = features, [(f["answer_at"], f["answer_at"] + 1) for f in features]
        batch = super().__call__(rows)
        answer = torch.zeros_like(batch["targets"], dtype=torch.bool)
        for row, (start, end) in enumerate(spans):
            answer[row, start - 1:end - 1] = True  # target t predicts token t+1
        batch["answer_mask"] = answer
        batch["class_id"] = torch.tensor([f["class_id"] for f in features])
        return batch


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


def per_row_sums(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Sum of per-token `values` (in the order of `selected`'s True entries) for each row of `selected`."""
    rows = selected.nonzero()[:, 0]
    return torch.zeros(selected.shape[0], device=values.device, dtype=values.dtype).index_add_(0, rows, values)


class CausalLanguageModeling(Task):
    model_class = AutoModelForCausalLM
    peft_task_type = TaskType.CAUSAL_LM

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase):
        super().__init__(recipe, tokenizer)
        self.renderer = TextRenderer(recipe.task, tokenizer)
        self.labels: Optional[LabelSpace] = None
        self.generation_prompts: list[dict[str, str]] = []
        self.class_tokens: Optional[list[int]] = None
        """Labelled eval: each class's single answer token, when every answer is one token after the same prompt."""

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

    output_files = (GENERATIONS,)

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        trained = {"chat": "assistant turns", "prompt_completion": "completions", "labelled": "answers"}[recipe.task.format]
        return f"causal LM SFT, format {recipe.task.format} (loss on the {trained} only)"

    @classmethod
    def memory_rows(cls, recipe: Recipe, vocab_size: int) -> dict[str, float]:
        """The LM head runs on the trained tokens only (at most batch x max_length of them), each a row of vocab
        logits kept in the compute dtype for backward, upcast to fp32 for the loss, and its fp32 gradient: 2 + 4 + 4
        bytes per logit under mixed precision, 4 + 4 + 4 in fp32. For Llama 3 (128k vocab) at batch 4 x 512 tokens
        that is 2.4 GiB per device, which computing logits for every position would spend on prompts too."""
        tokens = recipe.training.per_device_batch_size * recipe.data.max_length
        compute_bytes = 2 if recipe.training.precision in ("bf16", "fp16") else 4
        return {"LM-head logits of the trained tokens": tokens * vocab_size * (compute_bytes + 4 + 4)}

    @classmethod
    def columns(cls, recipe: Recipe) -> list[str]:
        task = recipe.task
        if task.format == "chat":
            return [task.messages_field]
        if task.format == "prompt_completion":
            return [task.prompt_field, task.completion_field]
        return labelled_text_columns(recipe.data)

    def class_of(self, row: dict[str, Any], where: str) -> int:
        label = row[self.recipe.data.label_field]
        index = class_id(label, self.labels)
        if index is None:
            raise DataError(f"{where}: column {self.recipe.data.label_field!r} holds {label!r}, which has no label "
                            f"word (task.label_words has {len(self.answers())} in id order)")
        return index

    def prepare_data(self, splits: Splits) -> Splits:
        if self.labelled:
            self.labels = resolve_labels(splits, self.recipe.data, self.recipe.task.label_count)
            self.notes.append("answers: " + ", ".join(f"{name} -> {word!r}" for name, word in zip(self.labels.names, self.answers())))
        train = self.tokenize_split(splits.train, splits.train_origin, evaluation=False)
        evaluation = self.tokenize_split(splits.eval, splits.eval_origin, evaluation=True) if splits.eval is not None else None
        if splits.eval is not None and self.recipe.task.generations:
            self.generation_prompts = [
                {"prompt": self.renderer.prompt_of(rendered), "reference": rendered.text[rendered.trained[-1][0]:]}
                for i, rendered in enumerate(self.render(splits.eval[i], f"{splits.eval_origin} row {i}")
                                             for i in range(min(self.recipe.task.generations, len(splits.eval))))
            ]
        return Splits(train, evaluation, splits.train_origin, splits.eval_origin)

    def tokenize_split(self, dataset: datasets.Dataset, origin: str, evaluation: bool) -> datasets.Dataset:
        max_length = self.recipe.data.max_length
        choices = evaluation and self.labelled

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            encoded = [self.encode_row(row, f"{origin} row {index}", max_length, choices) for index, row in zip(indices, rows)]
            return {column: [values[column] for values in encoded] for column in encoded[0]}

        tokenized = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                                desc=f"tokenizing {origin}")
        tokenized = self.drop_truncated(self.count_shortened(tokenized, origin), origin)
        return self.choose_scoring(tokenized) if choices else tokenized

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

    def count_shortened(self, tokenized: datasets.Dataset, origin: str) -> datasets.Dataset:
        """Notes how many kept rows were shortened (a row that does not fit even shortened is dropped, not counted)."""
        kept = ~np.asarray(tokenized["truncated"], dtype=bool)
        shortened = int(np.count_nonzero(np.asarray(tokenized["shortened"], dtype=bool) & kept))
        if shortened:
            side = self.recipe.task.shorten
            self.notes.append(f"{origin}: shortened the text of {shortened} of {len(tokenized)} rows at its {side} to "
                              f"fit data.max_length={self.recipe.data.max_length} with the instruction and the whole "
                              f"answer (task.shorten={side})")
        return tokenized.remove_columns("shortened")

    def choose_scoring(self, tokenized: datasets.Dataset) -> datasets.Dataset:
        """One forward per example when every row's answers are the same single tokens, else one per class."""
        per_row = tokenized["class_tokens"]
        if per_row and all(tokens == per_row[0] for tokens in per_row) and per_row[0] is not None:
            self.class_tokens = per_row[0]
            self.notes.append("answers are single tokens after the same prompt: one forward per eval example scores them all")
            return tokenized.remove_columns(["choice_input_ids", "choice_labels", "choice_answers", "class_tokens"])
        self.notes.append(f"answers span several tokens: eval scores each of the {len(self.answers())} per example")
        return tokenized.remove_columns(["answer_at", "class_tokens"])

    def drop_truncated(self, tokenized: datasets.Dataset, origin: str) -> datasets.Dataset:
        truncated = [i for i, cut in enumerate(tokenized["truncated"]) if cut]
        max_length = self.recipe.data.max_length
        if self.labelled:
            why = f"do not fit data.max_length={max_length}: the prompt template and the longest answer alone leave no room for their text"
        else:
            why = f"lose every trained token to data.max_length={max_length}"
        if truncated and self.recipe.task.on_truncated == "fail":
            raise DataError(f"{origin}: rows {truncated[:10]} {why}; raise data.max_length or set task.on_truncated=drop")
        if truncated:
            self.notes.append(f"{origin}: dropped {len(truncated)} of {len(tokenized)} rows that {why} (task.on_truncated=drop)")
            tokenized = tokenized.filter(lambda cut: not cut, input_columns="truncated")
        if len(tokenized) == 0:
            raise DataError(f"{origin}: no rows left to train on")
        return tokenized.remove_columns("truncated")

    def adapt_model(self, model: torch.nn.Module) -> None:
        enable_trained_token_batches(model)

    def class_ids(self, train: datasets.Dataset) -> Optional[list[int]]:
        return list(train["class_id"]) if self.labelled else None

    def collators(self) -> tuple[Collator, Collator]:
        multiple = 8 if self.recipe.training.precision != "fp32" else None
        padded = PaddedSFTCollator(self.tokenizer.pad_token_id, multiple)
        train = packed_sft_batch if self.recipe.data.padding == "packed" else padded
        return train, ChoiceCollator(self.tokenizer.pad_token_id, multiple) if self.labelled else padded

    def loss_items(self, batch: Batch, counted: torch.Tensor) -> int:
        return int((counted_targets(batch, counted) != IGNORE).sum())

    def loss(self, model: torch.nn.Module, batch: Batch, counted: torch.Tensor) -> torch.Tensor:
        return model(**(batch | {"targets": counted_targets(batch, counted)})).loss

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        loss_sums, token_counts, scores, references = [], [], [], []
        for batch in loader:
            answer_mask, label = batch.pop("answer_mask", None), batch.pop("class_id", None)
            out = model(**batch)
            row_loss = per_row_sums(out.token_losses, out.selected)
            row_tokens = out.selected.sum(dim=1)
            if self.labelled:
                by_class, gold = self.class_scores(out, answer_mask, label)
                gathered = accelerator.gather_for_metrics((row_loss[gold], row_tokens[gold], by_class, label))
                scores.append(gathered[2].cpu())
                references.append(gathered[3].cpu())
            else:
                gathered = accelerator.gather_for_metrics((row_loss, row_tokens))
            loss_sums.append(gathered[0].double().cpu())
            token_counts.append(gathered[1].cpu())
        loss = float(torch.cat(loss_sums).sum() / torch.cat(token_counts).sum())
        metrics = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
        if self.labelled:
            predictions = torch.cat(scores).argmax(dim=1).numpy()
            metrics |= compute_metrics(self.recipe.metric_names, predictions, torch.cat(references).numpy())
        return {**metrics, "examples": int(sum(len(c) for c in token_counts)), "tokens": int(torch.cat(token_counts).sum())}

    def class_scores(self, out: TrainedTokenOutput, answer_mask: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's log-prob of every class's answer ([examples, classes]) and the rows holding the gold answer."""
        examples = torch.arange(len(label), device=label.device)
        if self.class_tokens is not None:
            at_answer = out.logits[answer_mask[out.selected]].log_softmax(dim=-1)
            return at_answer[:, self.class_tokens], examples
        classes = len(self.answers())
        answer_logprob = -per_row_sums(out.token_losses * answer_mask[out.selected], out.selected)
        return answer_logprob.view(-1, classes), examples * classes + label

    @torch.no_grad()
    def after_evaluation(self, model: torch.nn.Module, accelerator: Accelerator, step: int, run_dir: Path) -> None:
        """Greedy continuations of the first eval prompts, next to what the data says (every rank generates: under
        ZeRO-3 each forward gathers the layers collectively)."""
        if not self.generation_prompts:
            return
        generator = accelerator.unwrap_model(model)
        records = []
        for example in self.generation_prompts:
            plain = not (self.renderer.has_template and (self.recipe.task.format == "chat" or self.recipe.task.use_chat_template))
            inputs = self.tokenizer(example["prompt"], add_special_tokens=plain, return_tensors="pt").to(accelerator.device)
            output = generator.generate(**inputs, max_new_tokens=self.recipe.task.max_new_tokens, do_sample=False,
                                        pad_token_id=self.tokenizer.pad_token_id, synced_gpus=is_deepspeed_zero3_enabled())
            generated = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            records.append({**example, "generated": generated})
        if accelerator.is_main_process:
            folder = run_dir / GENERATIONS
            folder.mkdir(exist_ok=True)
            lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            (folder / f"step-{step:08d}.jsonl").write_text(lines, encoding="utf-8")

