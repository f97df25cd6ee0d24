"""`task.type: dpo`: direct preference optimization (Rafailov et al. 2023; TRL's `DPOTrainer`).

The policy is the model being trained, the reference is the model it started as. Each answer's log-prob is the
sum over its tokens (the prompt is masked), computed with the LM head on the answer tokens only, as SFT does
(`trained_token_forward`). The reference costs no second copy under LoRA: it is the same model with its adapters
disabled. Without LoRA it is a frozen copy of the starting weights beside the policy (one process, DDP, ZeRO-1/2;
under ZeRO-3 or FSDP, where it would have to be sharded as the policy is, use LoRA). The reference runs without
gradients in the same forward as the policy, so the loop sees one model and one loss.

A pair's loss is `-log sigmoid(beta * m)` (or SLiC's hinge `max(0, 1 - beta * m)`) with
m = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), summed over the counted pairs for
the loop to average over the pairs of the optimizer step. Evaluation: the loss, implicit-reward accuracy
(beta * (log pi - log ref) higher for chosen), reward margins, both answers' log-probs, and greedy generations.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftModel, TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import ModelOutput

from launcher.data.sources import Splits
from launcher.model.forward_routes import add_forward_route, transformers_model_of
from launcher.model.loading import TORCH_DTYPES, ModelError
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Batch, Evaluation, Prepared
from launcher.tasks.causal_lm.generations import GENERATIONS, write_generations
from launcher.tasks.causal_lm.task import per_row_sums, trained_logits_bytes, trained_token_forward
from launcher.tasks.preference.batches import PairTask
from launcher.tasks.preference.pairs import pair_splits


@dataclass
class PairLogProbs(ModelOutput):
    """What the DPO forward returns: each answer's summed log-prob, `[pairs, 2]` (chosen, rejected), fp32."""

    policy: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None


def answer_logprobs(lm: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-prob of its trained (answer) tokens; a row without one sums to 0."""
    out = trained_token_forward(lm, input_ids, targets, attention_mask=attention_mask)
    return -per_row_sums(out.token_losses, out.selected)


def reference_of(model: torch.nn.Module) -> Callable[[torch.device], ContextManager[PreTrainedModel]]:
    """How the reference model is reached on the policy's device: the adapters disabled (LoRA), or a frozen copy
    of the starting weights, which the Accelerator does not move (it moves the policy only), so its first use does."""
    if isinstance(model, PeftModel):
        @contextlib.contextmanager
        def adapters_disabled(device: torch.device):
            with model.disable_adapter():
                yield transformers_model_of(model)
        return adapters_disabled
    if is_deepspeed_zero3_enabled() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ModelError("task.type dpo without LoRA keeps a frozen copy of the starting model as its reference, which "
                         "ZeRO-3 and FSDP would have to shard like the policy: enable lora (the reference is then the "
                         "same model with its adapters disabled) or use one process, DDP or ZeRO-1/2")
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def frozen_copy(device: torch.device):
        yield frozen.to(device)  # a no-op once it is there

    return frozen_copy


def enable_pair_batches(model: torch.nn.Module) -> None:
    """Let `model` take pair batches with `pair_targets`: the policy's and the reference's answer log-probs."""
    reference = reference_of(model)

    def forward(lm: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pair_targets: torch.Tensor) -> PairLogProbs:
        rows = (input_ids.flatten(0, 1), attention_mask.flatten(0, 1), pair_targets.flatten(0, 1))
        policy = answer_logprobs(lm, *rows)
        with torch.no_grad(), reference(input_ids.device) as reference_lm:
            base = answer_logprobs(reference_lm, *rows)
        return PairLogProbs(policy=policy.view(-1, 2), reference=base.view(-1, 2))

    add_forward_route(model, "pair_targets", forward)


class DirectPreferenceOptimization(PairTask):
    model_class = AutoModelForCausalLM
    peft_task_type = TaskType.CAUSAL_LM
    output_files = (GENERATIONS,)
    trains_tokens = True

    def __init__(self, recipe: Recipe, tokenizer: PreTrainedTokenizerBase,
                 generation_prompts: Sequence[dict[str, str]] = (), plain_prompts: bool = False):
        super().__init__(recipe, tokenizer)
        self.generation_prompts = list(generation_prompts)
        """The eval prompts greedily continued after each evaluation, with their chosen and rejected answers."""
        self.plain_prompts = plain_prompts

    @classmethod
    def describe(cls, recipe: Recipe) -> str:
        reference = "the adapters disabled" if recipe.lora.enabled else "a frozen copy of the starting model"
        return (f"DPO ({recipe.task.loss_type} loss, beta {recipe.task.beta:g}) on preference pairs, loss on the "
                f"answers only; reference: {reference}")

    @classmethod
    def memory_rows(cls, recipe: Recipe, vocab_size: int, parameters: int) -> dict[str, float]:
        rows = {"LM-head logits of the trained tokens": trained_logits_bytes(recipe, vocab_size, cls.sequences_per_example)}
        if recipe.lora.enabled:
            rows["reference model (the same weights, adapters disabled: no copy)"] = 0
        else:
            rows["reference model (frozen copy of the weights)"] = parameters * TORCH_DTYPES[recipe.model.load_dtype].itemsize
        return rows

    @classmethod
    def prepare(cls, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: Splits) -> Prepared:
        builder, train, evaluation = pair_splits(recipe, tokenizer, splits)
        prompts, plain = ([], False)
        if splits.eval is not None:
            prompts, plain = builder.generation_prompts(splits.eval, splits.eval_origin, recipe.task.generations)
        data = Splits(train.dataset, evaluation.dataset if evaluation else None, splits.train_origin, splits.eval_origin)
        return Prepared(cls(recipe, tokenizer, prompts, plain), data, train.notes + (evaluation.notes if evaluation else []))

    def adapt_model(self, model: torch.nn.Module) -> None:
        enable_pair_batches(model)

    def logprobs(self, model: torch.nn.Module, batch: Batch) -> PairLogProbs:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pair_targets=batch["pair_targets"])

    def pair_losses(self, out: PairLogProbs) -> torch.Tensor:
        ratios = out.policy - out.reference  # [pairs, 2]: log pi - log ref of chosen, rejected
        margin = self.recipe.task.beta * (ratios[:, 0] - ratios[:, 1])
        if self.recipe.task.loss_type == "hinge":
            return torch.relu(1 - margin)
        return -F.logsigmoid(margin)

    def loss(self, model: torch.nn.Module, batch: Batch, counted: torch.Tensor) -> torch.Tensor:
        losses = self.pair_losses(self.logprobs(model, batch))
        return losses[counted.to(losses.device)].sum()

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> Evaluation:
        policy, reference = [], []
        for batch in loader:
            out = self.logprobs(model, batch)
            gathered = accelerator.gather_for_metrics((out.policy, out.reference))
            policy.append(gathered[0].double().cpu())
            reference.append(gathered[1].double().cpu())
        out = PairLogProbs(policy=torch.cat(policy), reference=torch.cat(reference))
        rewards = self.recipe.task.beta * (out.policy - out.reference)
        metrics = {"loss": float(self.pair_losses(out).mean()),
                   "accuracy": float((rewards[:, 0] > rewards[:, 1]).double().mean()),
                   "margin": float((rewards[:, 0] - rewards[:, 1]).mean()),
                   "chosen_reward": float(rewards[:, 0].mean()), "rejected_reward": float(rewards[:, 1].mean()),
                   "chosen_logp": float(out.policy[:, 0].mean()), "rejected_logp": float(out.policy[:, 1].mean()),
                   "examples": len(rewards)}
        return Evaluation(metrics)

    def report(self, evaluation: Evaluation, model: torch.nn.Module, accelerator: Accelerator, step: int,
               run_dir: Path) -> None:
        """Greedy continuations of the first eval prompts, next to their chosen and rejected answers."""
        write_generations(model, self.tokenizer, self.generation_prompts, self.plain_prompts,
                          self.recipe.task.max_new_tokens, accelerator, step, run_dir)
