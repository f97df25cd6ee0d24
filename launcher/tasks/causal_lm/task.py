"""`task.type: causal_lm`: supervised fine-tuning (SFT) of a decoder's own LM head.

Rows become text with trained spans, then tokens whose next-token targets are IGNORE wherever nothing is trained
(`launcher.tasks.causal_lm.examples`), then padded or packed batches (`launcher.tasks.causal_lm.batches`). The loss is the mean over the trained tokens, and the LM head runs on those tokens
only: logits are batch x length x vocab floats (128k vocab for Llama 3), and most positions (prompts, padding)
need none. Labelled rows are also evaluated as classification, by scoring each label's words after the prompt and
taking the most likely (restricted choice, as lm-eval-harness does; multi-token answers sum their log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from launcher.data.loaders import column_values
from launcher.data.labels import LabelSpace, labelled_text_columns, resolve_labels
from launcher.data.sources import Splits
from launcher.model.forward_routes import add_forward_route
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Batch, Collator, Evaluation, Prepared, Task
from launcher.tasks.causal_lm.batches import ChoiceCollator, PaddedSFTCollator, packed_sft_batch
from launcher.tasks.causal_lm.examples import ExampleBuilder
from launcher.tasks.causal_lm.generations import GENERATIONS, write_generations
from launcher.tasks.causal_lm.rendering import IGNORE
from launcher.tasks.metrics import compute_metrics


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


def per_row_sums(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Sum of per-token `values` (in the order of `selected`'s True entries) for each row of `selected`."""
    rows = selected.nonzero()[:, 0]
    return torch.zeros(selected.shape[0], device=values.device, dtype=values.dtype).index_add_(0, rows, values)


def trained_logits_bytes(recipe: Recipe, vocab_size: int, sequences_per_example: int) -> float:
    """The LM head runs on the trained tokens only (at most batch x sequences x max_length of them), each a row of
    vocab logits kept in the compute dtype for backward, upcast to fp32 for the loss, and its fp32 gradient: 2 + 4 +
    4 bytes per logit under mixed precision, 4 + 4 + 4 in fp32. For Llama 3 (128k vocab) at batch 4 x 512 tokens
    that is 2.4 GiB per device, which computing logits for every position would spend on prompts too."""
    tokens = recipe.training.per_device_batch_size * sequences_per_example * recipe.data.max_length
    compute_bytes = 2 if recipe.training.precision in ("bf16", "fp16") else 4
    return tokens * vocab_size * (compute_bytes + 4 + 4)


class CausalLanguageModeling(Task):
    model_class = AutoModelForCausalLM
    peft_task_type = TaskType.CAUSAL_LM
    output_files = (GENERATIONS,)

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, labels: Optional[LabelSpace] = None,
                 class_tokens: Optional[list[int]] = None, generation_prompts: Sequence[dict[str, str]] = ()):
        super().__init__(recipe, tokenizer)
        self.examples = ExampleBuilder(recipe, tokenizer, labels)
        self.class_tokens = class_tokens
        """Labelled eval: each class's single answer token, when every answer is one token after the same prompt."""
        self.generation_prompts = list(generation_prompts)
        """The eval prompts greedily continued after each evaluation, with the data's answers."""

    @property
    def labelled(self) -> bool:
        return self.recipe.task.format == "labelled"

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        trained = {"chat": "assistant turns", "prompt_completion": "completions", "labelled": "answers"}[recipe.task.format]
        return f"causal LM SFT, format {recipe.task.format} (loss on the {trained} only)"

    @classmethod
    def memory_rows(cls, recipe: Recipe, vocab_size: int, parameters: int) -> dict[str, float]:
        return {"LM-head logits of the trained tokens": trained_logits_bytes(recipe, vocab_size, cls.sequences_per_example)}

    @classmethod
    def columns(cls, recipe: Recipe) -> list[str]:
        task = recipe.task
        if task.format == "chat":
            return [task.messages_field]
        if task.format == "prompt_completion":
            return [task.prompt_field, task.completion_field]
        return labelled_text_columns(recipe.data)

    @classmethod
    def prepare(cls, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> Prepared:
        labels, notes = None, []
        if recipe.task.format == "labelled":
            labels = resolve_labels(splits, recipe.data, recipe.task.label_count)
            answers = recipe.task.label_words or labels.names
            notes.append("answers: " + ", ".join(f"{name} -> {word!r}" for name, word in zip(labels.names, answers)))
        builder = ExampleBuilder(recipe, tokenizer, labels)
        train = builder.tokenize_split(splits.train, splits.train_origin, False, splits.map_plan)
        evaluation = (builder.tokenize_split(splits.eval, splits.eval_origin, True, splits.map_plan)
                      if splits.eval is not None else None)
        prompts = builder.generation_prompts(splits.eval, splits.eval_origin) if splits.eval is not None else []
        notes += train.notes + (evaluation.notes if evaluation else [])
        task = cls(recipe, tokenizer, labels, evaluation.class_tokens if evaluation else None, prompts)
        data = Splits(train.dataset, evaluation.dataset if evaluation else None, splits.train_origin, splits.eval_origin)
        return Prepared(task, data, notes)

    def adapt_model(self, model: torch.nn.Module) -> None:
        enable_trained_token_batches(model)

    def class_ids(self, train: datasets.Dataset) -> Optional[np.ndarray]:
        return column_values(train, "class_id") if self.labelled else None

    def collators(self) -> tuple[Collator, Collator]:
        multiple = 8 if self.recipe.training.precision != "fp32" else None
        padded = PaddedSFTCollator(self.tokenizer.pad_token_id, multiple)
        train = packed_sft_batch if self.recipe.data.padding == "packed" else padded
        return train, ChoiceCollator(self.tokenizer.pad_token_id, multiple) if self.labelled else padded

    def loss_items(self, batch: Batch, counted: torch.Tensor) -> int:
        return int((counted_targets(batch, counted) != IGNORE).sum())

    def loss(self, model: torch.nn.Module, batch: Batch, counted: torch.Tensor) -> torch.Tensor:
        return model(**(batch | {"targets": counted_targets(batch, counted)})).loss

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> Evaluation:
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
        return Evaluation({**metrics, "examples": int(sum(len(c) for c in token_counts)), "tokens": int(torch.cat(token_counts).sum())})

    def class_scores(self, out: TrainedTokenOutput, answer_mask: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's log-prob of every class's answer ([examples, classes]) and the rows holding the gold answer."""
        examples = torch.arange(len(label), device=label.device)
        if self.class_tokens is not None:
            at_answer = out.logits[answer_mask[out.selected]].log_softmax(dim=-1)
            return at_answer[:, self.class_tokens], examples
        classes = len(self.examples.answers())
        answer_logprob = -per_row_sums(out.token_losses * answer_mask[out.selected], out.selected)
        return answer_logprob.view(-1, classes), examples * classes + label

    def report(self, evaluation: Evaluation, model: torch.nn.Module, accelerator: Accelerator, step: int,
               run_dir: Path) -> None:
        """Greedy continuations of the first eval prompts, next to what the data says."""
        plain = not (self.examples.renderer.has_template and (self.recipe.task.format == "chat" or self.recipe.task.use_chat_template))
        write_generations(model, self.tokenizer, self.generation_prompts, plain, self.recipe.task.max_new_tokens,
                          accelerator, step, run_dir)
