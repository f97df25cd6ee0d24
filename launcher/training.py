"""The training loop: plain PyTorch under Accelerate, `train()` delegating to `train_step`, `evaluate`
and `save_checkpoint`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from launcher.checkpointing import Checkpointer, TrainPosition
from launcher.metrics import compute_metrics
from launcher.recipe import Recipe
from launcher.reporting import RunReporter
from launcher.stopping import StopRequest


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf and the recipe says stop."""


@dataclass
class StepResult:
    """One optimizer step, summed over all ranks: what the log and the benchmarks read."""

    loss: float
    grad_norm: Optional[float]
    skipped: bool
    samples: int
    real_tokens: int
    padded_tokens: int
    seconds: float


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: DataLoader,
        eval_loader: Optional[DataLoader],
        checkpointer: Checkpointer,
        position: TrainPosition,
        total_steps: int,
        stop_request: StopRequest,
    ):
        self.recipe = recipe
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.checkpointer = checkpointer
        self.position = position
        self.total_steps = total_steps
        self.stop_request = stop_request
        self.reporter: Optional[RunReporter] = None
        self.last_saved_step = position.optimizer_step if position.optimizer_step else -1
        self.final_metrics: dict[str, float] = {}

    def train(self) -> bool:
        """Train to the end of the schedule; returns False when stopped early by a signal (after checkpointing)."""
        self.reporter = RunReporter(self.accelerator, self.recipe.output.dir, self.total_steps, self.position.optimizer_step)
        try:
            while self.position.optimizer_step < self.total_steps:
                if not self.train_epoch():
                    return False
            return True
        finally:
            self.reporter.close()

    def train_epoch(self) -> bool:
        """One (possibly resumed) pass over the training data; False when a stop was requested."""
        self.model.train()
        self.train_loader.set_epoch(self.position.epoch)
        batches = self.accelerator.skip_first_batches(self.train_loader, self.position.batches_in_epoch)
        # Per rank, over one accumulation window: loss sum, samples, real tokens, padded tokens.
        window = torch.zeros(4, dtype=torch.float64, device=self.accelerator.device)
        window_start = time.perf_counter()
        for batch in batches:
            window += self.forward_backward(batch)
            self.position.batches_in_epoch += 1
            if not self.accelerator.sync_gradients:
                continue
            result = self.optimizer_step(window, window_start)
            window.zero_()
            window_start = time.perf_counter()
            self.after_step(result)
            if self.position.optimizer_step >= self.total_steps:
                break
            if self.stop_request.agreed(self.accelerator):
                self.save_checkpoint()
                return False
        self.end_epoch()
        return True

    def micro_batches_in_window(self) -> int:
        """Batches accumulated into this optimizer step (fewer at an epoch's ragged end)."""
        accumulation = self.recipe.training.gradient_accumulation_steps
        remainder = self.position.batches_in_epoch % accumulation
        return remainder or accumulation

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its (loss, samples, real tokens, padded tokens)."""
        with self.accelerator.accumulate(self.model):
            loss = self.model(**batch).loss
            self.accelerator.backward(loss)
        mask = batch["attention_mask"]
        counts = (loss.detach().double(), mask.shape[0], mask.sum().double(), mask.numel())
        return torch.stack([torch.as_tensor(c, dtype=torch.float64, device=mask.device) for c in counts])

    def optimizer_step(self, window: torch.Tensor, window_start: float) -> StepResult:
        """Clip, check for non-finite values (every rank sees the same reduced numbers), step or skip."""
        training = self.recipe.training
        loss_sum, samples, real_tokens, padded_tokens = self.accelerator.reduce(window, reduction="sum").tolist()
        loss = loss_sum / (self.micro_batches_in_window() * self.accelerator.num_processes)
        grad_norm = None
        if training.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), training.max_grad_norm))
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if not finite and training.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"non-finite loss {loss} / grad norm {grad_norm} at optimizer step {self.position.optimizer_step + 1}; "
                "no checkpoint was written with these values. Lower training.lr, check the data, or set "
                "training.on_nonfinite_loss=skip"
            )
        if finite:
            self.optimizer.step()
            if not self.accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # .tolist() above waited for the device, so the clock covers the real work of this step.
        seconds = time.perf_counter() - window_start
        return StepResult(loss, grad_norm, not finite, int(samples), int(real_tokens), int(padded_tokens), seconds)

    def after_step(self, result: StepResult) -> None:
        self.position.optimizer_step += 1
        step = self.position.optimizer_step
        lr = self.scheduler.get_last_lr()[0]
        self.position.samples_seen += result.samples
        self.reporter.advance(result.loss, lr, result.samples / result.seconds)
        if step % self.recipe.training.log_every_steps == 0 or result.skipped:
            record = {
                "epoch": self.position.epoch, "loss": result.loss, "lr": lr, "samples": result.samples,
                "real_tokens": result.real_tokens, "padded_tokens": result.padded_tokens, "step_seconds": result.seconds,
            }
            if result.grad_norm is not None:
                record["grad_norm"] = result.grad_norm
            if result.skipped:
                record["skipped_nonfinite"] = True
            self.reporter.log("train", step, record)
        every = self.recipe.evaluation.every_steps
        if every and step % every == 0:
            self.evaluate()
        every = self.recipe.output.save_every_steps
        if every and step % every == 0:
            self.save_checkpoint()

    def end_epoch(self) -> None:
        self.position.epoch += 1
        self.position.batches_in_epoch = 0
        self.evaluate()
        if self.recipe.output.save_every_epoch:
            self.save_checkpoint()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and the recipe's metrics over the whole eval set, exact across processes (`gather_for_metrics`)."""
        if self.eval_loader is None:
            return {}
        self.model.eval()
        losses, predictions, references = [], [], []
        for batch in self.eval_loader:
            logits = self.model(**batch).logits
            logits, labels = self.accelerator.gather_for_metrics((logits, batch["labels"]))
            losses.append(F.cross_entropy(logits.float(), labels, reduction="none").cpu())
            predictions.append(logits.argmax(dim=-1).cpu())
            references.append(labels.cpu())
        self.model.train()
        metrics = compute_metrics(self.recipe.evaluation.metrics, torch.cat(predictions).numpy(), torch.cat(references).numpy())
        metrics = {"loss": float(torch.cat(losses).mean()), **metrics, "examples": int(np.sum([len(r) for r in references]))}
        self.reporter.log("eval", self.position.optimizer_step, {"epoch": self.position.epoch, **metrics})
        self.final_metrics = metrics
        return metrics

    def save_checkpoint(self) -> None:
        if self.position.optimizer_step == self.last_saved_step:
            return
        self.checkpointer.save(self.position)
        self.last_saved_step = self.position.optimizer_step
