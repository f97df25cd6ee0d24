"""TRL's `SFTTrainer`, the SFT baseline users would run instead of the launcher, timed like it for `benchmarks.compare`.

    python -m benchmarks.trl_baseline RECIPE [a.b=value ...] --way padded --steps 50 --out DIR

- `padded`: `SFTTrainer` with its default collator, each batch padded to its longest member.
- `padding_free`: `padding_free=True`, the batch's examples flattened into one row with `position_ids` restarting
  per example. TRL documents it for FlashAttention; on other kernels (CPU sdpa) transformers reads the restarting
  positions as separate sequences and builds a block-diagonal mask, so each example attends to itself only.

Same rows as the launcher: the recipe's seeded subsets through the launcher's loaders, rendered as TRL's
conversational prompt-completion rows (prompt: the system message, if any, and the user turn; completion: the
assistant turn with the answer), so TRL applies the same chat template and `completion_only_loss=True` trains the
completion only. Model, tokenizer, per-device batch, accumulation, optimizer and schedule come from the recipe
(`benchmarks.tutorial_baselines.training_arguments`). TRL's completion is everything the template renders after the
generation prompt, so where a template ends a turn with a newline after its end-of-turn token (SmolLM2, Llama 3)
TRL also trains that newline, which the launcher leaves out: the train records count the tokens each trains.

The eval record's `loss` (and accuracy) is the launcher's own evaluation of the trained model on the launcher's
eval tokens: the mean over every trained token of the eval set. TRL's `evaluate()` gives `trl_eval_loss`: the mean
of per-batch token means weighted by examples, over TRL's completion tokens, which is a different number.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import datasets
import torch
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase, TrainingArguments

from benchmarks.tutorial_baselines import (
    CountingCollator, StepClock, baseline_main, device_peak, launcher_evaluation, training_arguments,
)
from launcher.data.sources import load_splits
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.schema import Recipe
from launcher.tasks.causal_lm.rendering import IGNORE
from launcher.tasks.causal_lm.task import CausalLanguageModeling

if TYPE_CHECKING:
    from trl import SFTConfig

WAYS = ("padded", "padding_free")


class TrainingForwardCounter(CountingCollator):
    """(samples, real tokens, padded tokens) of every training forward, as `StepClock` takes them, and the trained
    tokens (targets that are not -100, after the shift). Counted where the model receives the batch, a forward
    pre-hook, not in the collator: Accelerate's dataloader collates one batch ahead of the one being trained."""

    def __init__(self):
        super().__init__(collate=lambda batch: batch)
        self.trained = 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        ids, labels = kwargs["input_ids"], kwargs["labels"]
        if "attention_mask" in kwargs:
            samples, real = ids.shape[0], int(kwargs["attention_mask"].sum())
        else:  # padding-free: one row, positions restart at each example
            samples, real = int((kwargs["position_ids"] == 0).sum()), ids.numel()
        self.pending.append((samples, real, ids.numel()))
        self.trained += int((labels[:, 1:] != IGNORE).sum())

    def take_trained(self) -> int:
        trained, self.trained = self.trained, 0
        return trained


class TrainedTokenClock(StepClock):
    """`StepClock`'s record of each optimizer step with the step's trained tokens added."""

    def on_step_end(self, args, state, control, **kwargs):
        trained = self.collator.take_trained()
        super().on_step_end(args, state, control, **kwargs)
        self.records[-1]["trained_tokens"] = trained


def check_comparable(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    task = recipe.task
    if task.type != "causal_lm" or task.format == "chat" or not (task.use_chat_template and tokenizer.chat_template):
        raise SystemExit("benchmarks.trl_baseline compares causal_lm recipes of format labelled or prompt_completion "
                         "rendered with a chat template (TRL's conversational prompt-completion rows)")


def conversation(task: CausalLanguageModeling, row: dict[str, Any], where: str) -> dict[str, list[dict[str, str]]]:
    """One row as TRL's conversational prompt-completion example, with the launcher's prompt and answer."""
    spec, data = task.recipe.task, task.recipe.data
    if spec.format == "labelled":
        texts = {"text": row[data.text_field], **({"text_pair": row[data.text_pair_field]} if data.text_pair_field else {})}
        prompt, answer = spec.prompt_template.format(**texts), task.examples.answers()[task.examples.class_of(row, where)]
    else:
        prompt, answer = row[spec.prompt_field], row[spec.completion_field]
    system = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    return {"prompt": system + [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def conversations(task: CausalLanguageModeling, split: datasets.Dataset, origin: str) -> tuple[datasets.Dataset, int]:
    """The split's rows as conversations, without those longer than `data.max_length` tokens (returned: how many).

    The launcher cuts rows at `data.max_length` and drops those that lose their answer; TRL's padding-free way
    refuses a `max_length` (it cannot truncate a flattened row), so both TRL ways get rows that need no cut."""
    tokenizer, limit = task.tokenizer, task.recipe.data.max_length
    rows = [conversation(task, split[i], f"{origin} row {i}") for i in range(len(split))]
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = [r for r, length in zip(rows, lengths) if length <= limit]
    return datasets.Dataset.from_list(kept), len(rows) - len(kept)


def trl_arguments(recipe: Recipe, steps: int, out: Path) -> dict[str, Any]:
    """The tutorial baselines' `TrainingArguments` (the recipe's batch, optimizer, schedule, seed) as keyword
    arguments of a TRL config, with TRL's own defaults that would change the work set back to the recipe's: TRL
    turns on gradient checkpointing and bf16 by default."""
    base = training_arguments(recipe, steps, out)
    shared = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return shared | {"gradient_checkpointing": recipe.model.gradient_checkpointing,
                     "bf16": recipe.training.precision == "bf16", "fp16": recipe.training.precision == "fp16"}


def sft_config(recipe: Recipe, way: str, steps: int, out: Path) -> SFTConfig:
    """`trl_arguments` as an `SFTConfig`: completion-only loss, padded or padding-free."""
    from trl import SFTConfig  # here: `benchmarks.compare` imports this module for classification recipes too

    return SFTConfig(
        **trl_arguments(recipe, steps, out),
        completion_only_loss=True,
        padding_free=way == "padding_free",
        max_length=None if way == "padding_free" else recipe.data.max_length,
    )


def run_baseline(recipe: Recipe, way: str, steps: int, out: Path) -> list[dict[str, Any]]:
    """Train `steps` optimizer steps with TRL's `SFTTrainer` the given way, evaluate once; returns the log records."""
    from trl import SFTTrainer

    set_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model)
    check_comparable(recipe, tokenizer)
    splits = load_splits(recipe.data, CausalLanguageModeling.columns(recipe))
    prepared = CausalLanguageModeling.prepare(recipe, tokenizer, splits)  # also the label words the conversations answer with
    task, launcher_tokens = prepared.task, prepared.data
    train, train_over = conversations(task, splits.train, splits.train_origin)
    evaluation, eval_over = conversations(task, splits.eval, splits.eval_origin)
    model, _ = load_model(recipe, task, tokenizer)
    counter = TrainingForwardCounter()
    model.register_forward_pre_hook(counter, with_kwargs=True)
    clock = TrainedTokenClock(counter)
    trainer = SFTTrainer(model=model, args=sft_config(recipe, way, steps, out), train_dataset=train,
                         eval_dataset=evaluation, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    record = {"kind": "eval", "step": steps, **launcher_evaluation(trainer, task, launcher_tokens.eval),
              "trl_eval_loss": trainer.evaluate()["eval_loss"], "truncate_at": recipe.data.max_length,
              "pad_to": "batch" if way == "padded" else "none", "rows_over_max_length": {"train": train_over, "eval": eval_over}}
    return [*clock.records, record | device_peak()]


def main(argv: Optional[list[str]] = None) -> int:
    return baseline_main(argv, "Train a causal_lm recipe with TRL's SFTTrainer and log it like the launcher.", WAYS,
                         run_baseline)


if __name__ == "__main__":
    raise SystemExit(main())
