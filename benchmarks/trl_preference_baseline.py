"""TRL's `RewardTrainer` and `DPOTrainer`, the preference baselines users would run instead of the launcher, timed
like it for `benchmarks.compare`.

    python -m benchmarks.trl_preference_baseline RECIPE [a.b=value ...] --way reward --steps 50 --out DIR

The way is the recipe's `task.type` (`reward` or `dpo`). Same pairs as the launcher: the recipe's seeded subsets
through the launcher's loaders, as TRL's conversational rows (prompt: the system message, if any, and the user
turn; chosen / rejected: the assistant turn), so TRL applies the same chat template. Model (with LoRA as the recipe
says, loaded by the launcher's own `load_model`), per-device batch, accumulation, optimizer, schedule and seed come
from the recipe (`benchmarks.tutorial_baselines.training_arguments`), with TRL's `max_length` at the recipe's and
TRL's reward centring and `beta` at the recipe's. TRL's own defaults that differ are left as TRL ships them and
named here: `disable_dropout=True` in both (the demo recipes set `lora.dropout: 0` so that no dropout is left
on either side), DPO's reference through `use_adapter` (LoRA, as the launcher's adapters disabled) or a second
model loaded from the same folder, and TRL keeping (not shortening) prompts, dropping rows over `max_length`
(reward) or truncating the whole sequence at its end (DPO).

Each training forward is counted where the model receives it (a forward pre-hook, gradients enabled: DPO's
reference forward runs on the same module under `no_grad` and is not a step's work twice). The eval record's
metrics are the launcher's own evaluation of the trained model on the launcher's eval pairs (pairwise accuracy of
the rewards, or DPO's implicit-reward accuracy against the starting model), so both sides are scored alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from benchmarks.trl_baseline import trl_arguments
from benchmarks.tutorial_baselines import CountingCollator, StepClock, baseline_main, device_peak, launcher_evaluation
from launcher.data.sources import load_splits
from launcher.model.loading import load_model, load_tokenizer
from launcher.recipe.schema import Recipe
from launcher.tasks import task_class
from launcher.tasks.preference.pairs import PairReader

WAYS = ("reward", "dpo")


class PairForwardCounter(CountingCollator):
    """(pairs, real tokens, padded tokens) of every training forward, as `StepClock` takes them: TRL stacks a
    batch's chosen rows over its rejected rows, so a forward of 2B rows is B pairs."""

    def __init__(self):
        super().__init__(collate=lambda batch: batch)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            ids = kwargs["input_ids"]
            self.pending.append((ids.shape[0] // 2, int(kwargs["attention_mask"].sum()), ids.numel()))


def check_comparable(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, way: str) -> None:
    if recipe.task.type != way:
        raise SystemExit(f"--way {way} compares recipes of task.type {way}; this one is {recipe.task.type}")
    if not (recipe.task.use_chat_template and tokenizer.chat_template):
        raise SystemExit("benchmarks.trl_preference_baseline compares pairs rendered with a chat template "
                         "(TRL's conversational rows)")


def conversation(reader: PairReader, recipe: Recipe, row: dict[str, Any], where: str) -> dict[str, list[dict[str, str]]]:
    """One row as TRL's conversational preference example, read as the launcher reads it."""
    pair = reader.read(row, where)
    prompt = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
    system = ([{"role": "system", "content": recipe.task.system_prompt}]
              if recipe.task.system_prompt and not isinstance(pair.prompt, list) else [])
    chosen, rejected = (answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
                        for answer in pair.answers)
    return {"prompt": system + prompt, "chosen": chosen, "rejected": rejected}


def conversations(recipe: Recipe, split: datasets.Dataset, origin: str) -> datasets.Dataset:
    reader = PairReader(recipe.task)
    return datasets.Dataset.from_list([conversation(reader, recipe, split[i], f"{origin} row {i}") for i in range(len(split))])


def trl_config(recipe: Recipe, way: str, steps: int, out: Path):
    """`trl_arguments` as TRL's config of the way, with the recipe's `max_length`, centring and `beta`."""
    from trl import DPOConfig, RewardConfig  # here: `benchmarks.compare` imports this module for every recipe

    shared = trl_arguments(recipe, steps, out) | {"max_length": recipe.data.max_length}
    if way == "reward":
        return RewardConfig(**shared, center_rewards_coefficient=recipe.task.center_rewards_coefficient)
    return DPOConfig(**shared, beta=recipe.task.beta, loss_type=[recipe.task.loss_type])


def run_baseline(recipe: Recipe, way: str, steps: int, out: Path) -> list[dict[str, Any]]:
    """Train `steps` optimizer steps with TRL's trainer of the way, evaluate once; returns the log records."""
    from trl import DPOTrainer, RewardTrainer

    set_seed(recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model)
    check_comparable(recipe, tokenizer, way)
    task_type = task_class(recipe)
    splits = load_splits(recipe.data, task_type.columns(recipe))
    prepared = task_type.prepare(recipe, tokenizer, splits)
    train, evaluation = (conversations(recipe, split, origin) for split, origin in
                         ((splits.train, splits.train_origin), (splits.eval, splits.eval_origin)))
    model, _ = load_model(recipe, prepared.task, tokenizer)  # its pair-batch route is used by the evaluation only
    counter = PairForwardCounter()
    model.register_forward_pre_hook(counter, with_kwargs=True)
    clock = StepClock(counter)
    trainer_class = RewardTrainer if way == "reward" else DPOTrainer
    trainer = trainer_class(model=model, args=trl_config(recipe, way, steps, out), train_dataset=train,
                            eval_dataset=evaluation, processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    record = {"kind": "eval", "step": steps, **launcher_evaluation(trainer, prepared.task, prepared.data.eval),
              "truncate_at": recipe.data.max_length, "pad_to": "batch"}
    return [*clock.records, record | device_peak()]


def main(argv: Optional[list[str]] = None) -> int:
    return baseline_main(argv, "Train a reward or dpo recipe with TRL's trainer and log it like the launcher.", WAYS,
                         run_baseline)


if __name__ == "__main__":
    raise SystemExit(main())
