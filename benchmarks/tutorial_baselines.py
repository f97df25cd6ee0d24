"""The seed tutorials' way of fine-tuning, timed like the launcher, as the baselines of `benchmarks.compare`.

    python -m benchmarks.tutorial_baselines RECIPE [a.b=value ...] --way max_length --steps 125 --out DIR

- `max_length`: the Yelp tutorials, every text padded to `model_max_length=322` before training, plain
  `transformers.Trainer` with its default collator.
- `dynamic`: the MRPC tutorial, `DataCollatorWithPadding` pads each batch to its longest member.

Model, tokenizer, data, subsets, label ids, truncation, per-device batch, seed and the optimizer's hyper-parameters
come from the recipe (through the launcher's own loaders), so only the training machinery differs. Both ways
truncate at the recipe's `data.max_length`, as the launcher does, not at the tokenizer's `model_max_length`: that
limit can be longer (MiniLM's 512 against a recipe's 256 read 406 tokens a news article against the launcher's 250)
or no limit at all (decoder tokenizers report 1e30). The padded way still pads to the tutorial's 322, or to
`data.max_length` where that is longer. The run writes a
`metrics.jsonl` with the launcher's record layout (one `train` record per optimizer step, one `eval`
record), which `benchmarks.measure` reads for both.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import numpy as np
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.utils import logging as hf_logging

from launcher.data.sources import Splits, load_splits
from launcher.distributed.devices import detect_device, peak_allocated_bytes
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.loading import load_recipe
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Task
from launcher.tasks.metrics import compute_metrics
from launcher.tasks.sequence_classification.single_label import SequenceClassification
from launcher.train.optimization import warmup_steps
from launcher.train.reporting import METRICS_LOG

TUTORIAL_MAX_LENGTH = 322  # the Yelp tutorials' `model_max_length`
WAYS = ("max_length", "dynamic")


class CountingCollator:
    """Wraps a collator and keeps (samples, real tokens, padded tokens) of each batch it builds."""

    def __init__(self, collate: Callable[[list], dict]):
        self.collate = collate
        self.pending: list[tuple[int, int, int]] = []

    def __call__(self, features: list) -> dict:
        batch = self.collate(features)
        mask = batch["attention_mask"]
        self.pending.append((int(mask.shape[0]), int(mask.sum()), int(mask.numel())))
        return batch

    def take(self) -> tuple[int, int, int]:
        """Totals of the batches built since the last call."""
        totals = tuple(int(sum(column)) for column in zip(*self.pending)) or (0, 0, 0)
        self.pending.clear()
        return totals


def synchronize() -> None:
    """Wait for queued device work, so a step's clock covers it (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elif hasattr(torch, "npu") and torch.npu.is_available():
        torch.npu.synchronize()


class StepClock(TrainerCallback):
    """One launcher-style `train` record per optimizer step: from the end of the previous step (so data
    loading is inside) to the end of this one (after the optimizer and scheduler step)."""

    def __init__(self, collator: CountingCollator):
        self.collator = collator
        self.records: list[dict[str, Any]] = []
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        now = time.perf_counter()
        samples, real, padded = self.collator.take()
        self.records.append({
            "kind": "train", "step": state.global_step, "samples": samples, "real_tokens": real,
            "padded_tokens": padded, "step_seconds": now - self.last,
        })
        self.last = now


def baseline_lengths(recipe: Recipe, way: str) -> dict[str, Any]:
    """Where a baseline's texts end (`truncate_at`) and what they are padded to (`pad_to`, `batch`: each batch's
    longest)."""
    pad_to = max(tutorial_max_length(recipe), recipe.data.max_length) if way == "max_length" else "batch"
    return {"truncate_at": recipe.data.max_length, "pad_to": pad_to}


def pad_every_text(tokenized: Splits, tokenizer: PreTrainedTokenizerBase, length: int) -> Splits:
    """The Yelp tutorials' `padding="max_length"`: every text padded in the `map`, before training."""
    def pad(batch: dict) -> dict:
        return tokenizer.pad(batch, padding="max_length", max_length=length)

    train, evaluation = (split.map(pad, batched=True, desc=f"padding to {length}") for split in (tokenized.train, tokenized.eval))
    return Splits(train, evaluation, tokenized.train_origin, tokenized.eval_origin)


def training_arguments(recipe: Recipe, steps: int, out: Path) -> TrainingArguments:
    training = recipe.training
    return TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=training.per_device_batch_size,
        per_device_eval_batch_size=recipe.eval_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_steps=steps,
        learning_rate=training.lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_betas[0],
        adam_beta2=training.adam_betas[1],
        adam_epsilon=training.adam_eps,
        lr_scheduler_type="constant_with_warmup" if training.scheduler == "constant" else training.scheduler,
        warmup_steps=warmup_steps(training, steps),
        max_grad_norm=training.max_grad_norm or 0.0,
        seed=training.seed,
        # The recipe's mixed precision, as the launcher runs it (fp32 otherwise: the Trainer's default); the Trainer
        # takes bf16 on a CPU only when told it trains there.
        bf16=training.precision == "bf16",
        fp16=training.precision == "fp16",
        use_cpu=detect_device().type == "cpu",
        dataloader_num_workers=recipe.data.num_workers,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def run_baseline(recipe: Recipe, way: str, steps: int, out: Path) -> list[dict[str, Any]]:
    """Train `steps` optimizer steps the tutorial's way, evaluate once; returns the log records."""
    set_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model)
    lengths = baseline_lengths(recipe, way)
    # Tokenized unpadded and truncated at data.max_length, as the launcher's dynamic padding does; never packed.
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"padding": "dynamic"})})
    prepared = SequenceClassification.prepare(recipe, tokenizer, load_splits(recipe.data, SequenceClassification.columns(recipe)))
    task, tokenized = prepared.task, prepared.data
    if way == "max_length":
        tokenized = pad_every_text(tokenized, tokenizer, lengths["pad_to"])
    collator = CountingCollator(default_data_collator if way == "max_length" else DataCollatorWithPadding(tokenizer))
    clock = StepClock(collator)
    trainer = Trainer(
        model=load_model(recipe, task, tokenizer)[0],
        args=training_arguments(recipe, steps, out),
        train_dataset=tokenized.train,
        data_collator=collator,
        callbacks=[clock],
    )
    trainer.train()
    prediction = trainer.predict(tokenized.eval)
    metrics = compute_metrics(recipe.metric_names, np.argmax(prediction.predictions, axis=-1), prediction.label_ids)
    evaluation = {"kind": "eval", "step": steps, "loss": prediction.metrics["test_loss"], **metrics,
                  "examples": len(prediction.label_ids), **lengths}
    return [*clock.records, evaluation | device_peak()]


@torch.no_grad()
def launcher_evaluation(trainer: Trainer, task: Task, evaluation: datasets.Dataset) -> dict[str, Any]:
    """The launcher's own evaluation of a model a baseline trained, on the launcher's eval rows: both sides are
    scored alike."""
    _, collate = task.collators()
    loader = DataLoader(evaluation, batch_size=task.recipe.eval_batch_size, shuffle=False, collate_fn=collate)
    trainer.model.eval()
    return task.evaluate(trainer.model, loader, trainer.accelerator).metrics


def device_peak() -> dict[str, int]:
    """The device allocator's high-water mark for the eval record (nothing on CPU)."""
    peak = peak_allocated_bytes(detect_device().type)
    return {} if peak is None else {"peak_device_memory_bytes": peak}


def tutorial_max_length(recipe: Recipe) -> int:
    """322, or fewer for a model with fewer positions (the tests' tiny BERT cannot take 322)."""
    return min(TUTORIAL_MAX_LENGTH, AutoConfig.from_pretrained(recipe.model.name_or_path).max_position_embeddings)


def write_log(out: Path, records: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_LOG).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def parse_args(argv: Optional[list[str]], description: str, ways: tuple[str, ...]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--way", choices=ways, required=True)
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps to train")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.jsonl")
    return parser.parse_args(argv)


def baseline_main(argv: Optional[list[str]], description: str, ways: tuple[str, ...],
                  run: Callable[[Recipe, str, int, Path], list[dict[str, Any]]]) -> int:
    """A baseline's command line: train the recipe `--way` for `--steps` steps, write its log to `--out`."""
    args = parse_args(argv, description, ways)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    recipe = load_recipe(args.recipe, args.overrides)
    write_log(args.out, run(recipe, args.way, args.steps, args.out))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return baseline_main(argv, "Train a recipe the seed tutorials' way and log it like the launcher.", WAYS, run_baseline)


if __name__ == "__main__":
    raise SystemExit(main())
