"""The training loop: plain PyTorch under Accelerate, `train()` delegating to `optimizer_step`, `evaluate`
and `save_checkpoint`. What is learned (model outputs, loss, metrics) is the task's (`launcher.tasks`).

The loss of an optimizer step is the mean over all loss items of the step (examples, or trained tokens), across
its micro-batches and processes, not a mean of per-micro-batch means: with tokens, micro-batches hold different
numbers of them, and averaging their means would weigh a token of a short batch more (transformers' own
gradient-accumulation bug, fixed in transformers PR 34191). The window's micro-batches are fetched first, their
items counted and summed over the processes, and each micro-batch's loss sum is divided by that count. The
examples Accelerate repeats to give every rank a batch in an epoch's last round count nothing
(`TrainingLoop.counted_examples`); a step with no item at all makes no update.
"""

from __future__ import annotations

import itertools
import math
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from launcher.data.batches import example_token_ids, real_tokens
from launcher.distributed.devices import peak_allocated_bytes
from launcher.recipe.schema import Recipe
from launcher.tasks.base import Batch, Task
from launcher.train.checkpoints import CheckpointCost, Checkpointer, TrainPosition, folder_bytes
from launcher.train.reporting import RunReporter
from launcher.train.stopping import StoppedOnEveryRank, StopRequest


WINDOW_TOTALS = ("loss_sum", "loss_items", "samples", "real_tokens", "padded_tokens")
"""What an optimizer step's micro-batches add up to on a rank, summed over the ranks in one all-reduce: `samples`
counts the examples learned from (not the repeats of an epoch's last round), the tokens count what ran."""


class NonFiniteLossError(StoppedOnEveryRank):
    """The loss, gradient norm or weights became NaN/inf (and, for loss and gradient, the recipe says stop)."""


class CollectiveError(RuntimeError):
    """A collective (all-reduce, barrier) failed or timed out: a peer rank died or stopped responding."""


@dataclass
class StepResult:
    """One optimizer step, summed over all ranks: what the log and the benchmarks read."""

    loss: Optional[float]
    """None when the step had no loss item (an empty window: no update, the schedule holds)."""
    grad_norm: Optional[float]
    skipped: bool
    loss_items: int
    """What the loss averages over: examples, or trained tokens (causal_lm)."""
    samples: int
    real_tokens: int
    padded_tokens: int
    seconds: float
    sample_fingerprints: Optional[list[int]] = None


def raised_by_collective(err: RuntimeError) -> bool:
    """A failed or timed-out collective: gloo reports these as a plain RuntimeError, so look at where it came from."""
    if isinstance(err, torch.distributed.DistError):
        return True
    return any(Path(frame.filename).match("torch/distributed/*.py") for frame in traceback.extract_tb(err.__traceback__))


class TrainingLoop:
    def __init__(
        self,
        recipe: Recipe,
        accelerator: Accelerator,
        task: Task,
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
        self.task = task
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
        self.last_eval_step = -1
        self.window_fingerprints: list[int] = []
        self.checkpoint_saves: list[dict[str, float]] = []
        """Each save's seconds, GB and GB/s, as logged (`kind: checkpoint`), for the run summary."""

    def train(self) -> bool:
        """Train to the end of the schedule; returns False when stopped early by a signal (after checkpointing)."""
        self.reporter = RunReporter(self.accelerator, self.recipe.output.dir, self.total_steps, self.position.optimizer_step)
        try:
            if self.recipe.evaluates_before_training and self.position.optimizer_step == 0:
                self.evaluate()
            while self.position.optimizer_step < self.total_steps:
                if not self.train_epoch():
                    return False
            return True
        except RuntimeError as err:
            if not raised_by_collective(err):
                raise
            raise CollectiveError(
                f"rank {self.accelerator.process_index}: a collective failed in optimizer step "
                f"{self.position.optimizer_step + 1} (epoch {self.position.epoch}; step {self.position.optimizer_step} "
                f"completed): a peer rank died or did not answer within training.collective_timeout_s="
                f"{self.recipe.training.collective_timeout_s}. Resume from the latest checkpoint with "
                f"output.resume_from=auto. ({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from err
        finally:
            self.reporter.close()

    def train_epoch(self) -> bool:
        """One (possibly resumed) pass over the training data; False when a stop was requested."""
        self.model.train()
        self.train_loader.set_epoch(self.position.epoch)
        window_start = time.perf_counter()  # the step's time includes fetching its batches
        for window in self.accumulation_windows(self.epoch_batches()):
            result = self.optimizer_step(self.forward_backward(window), window_start)
            window_start = time.perf_counter()
            self.after_step(result)
            if self.position.optimizer_step >= self.total_steps:
                break
            if self.stop_request.agreed(self.accelerator):
                self.save_checkpoint()
                return False
        self.end_epoch()
        return True

    def accumulation_windows(self, batches) -> Iterator[list[Batch]]:
        """The micro-batches of each optimizer step, fetched together (the last of an epoch may be shorter)."""
        accumulation = self.recipe.training.gradient_accumulation_steps
        batches = iter(batches)
        while window := list(itertools.islice(batches, accumulation)):
            yield window

    def epoch_batches(self):
        """The rest of this epoch's batches. Starting a DataLoader iterator draws a worker seed from the global CPU
        generator. An uninterrupted run made that draw when the epoch began, before any checkpoint inside it, so a
        run resumed mid-epoch starts its iterator off the global stream: dropout then sees the same numbers."""
        batches = iter(self.accelerator.skip_first_batches(self.train_loader, self.position.batches_in_epoch))
        if self.position.batches_in_epoch == 0:
            return batches
        with torch.random.fork_rng(devices=[]):
            first = next(batches, None)
        return itertools.chain([first] if first is not None else [], batches)

    def forward_backward(self, window: list[Batch]) -> torch.Tensor:
        """Forward and backward of one optimizer step's micro-batches, each micro-batch's loss sum divided by the
        step's loss items over all processes; returns this rank's WINDOW_TOTALS. A step without any loss item
        (every trained token cut away) runs no forward at all: there is nothing to learn, and no NaN to divide."""
        counted = [self.counted_examples(self.position.batches_in_epoch + i, batch) for i, batch in enumerate(window)]
        items = [self.task.loss_items(batch, mask) for batch, mask in zip(window, counted)]
        device = self.accelerator.device
        step_items = float(sum(items))
        if self.accelerator.num_processes > 1:  # one process knows its count on the host: no device round trip
            step_items = self.accelerator.reduce(torch.tensor(step_items, device=device), reduction="sum").item()
        # Accelerate (or DeepSpeed) divides each micro-batch's loss by the accumulation steps and DDP averages the
        # gradients over the processes; this weight undoes both and divides by the step's items instead.
        scale = self.accelerator.gradient_accumulation_steps * self.accelerator.num_processes / max(step_items, 1.0)
        # Sync (all-reduce, optimizer step) exactly at the window's last micro-batch, whatever its length.
        self.accelerator.step = self.accelerator.gradient_accumulation_steps - len(window)
        totals = torch.zeros(len(WINDOW_TOTALS), dtype=torch.float64, device=device)
        for batch, mask, batch_items in zip(window, counted, items):
            loss_sum = torch.zeros((), device=device)
            if step_items:
                with self.accelerator.accumulate(self.model):
                    loss_sum = self.task.loss(self.model, batch, mask)
                    self.accelerator.backward(loss_sum * scale)
            self.position.batches_in_epoch += 1
            examples = [ids for ids, kept in zip(example_token_ids(batch), mask.tolist()) if kept]
            if self.recipe.training.log_sample_fingerprints:
                self.window_fingerprints += [zlib.crc32(ids.cpu().numpy().tobytes()) for ids in examples]
            batch_totals = (loss_sum.detach().double(), batch_items, len(examples), real_tokens(batch), batch["input_ids"].numel())
            totals += torch.stack([torch.as_tensor(c, dtype=torch.float64, device=device) for c in batch_totals])
        return totals

    def counted_examples(self, batch_in_epoch: int, batch: Batch) -> torch.Tensor:
        """Which examples of this rank's micro-batch are the epoch's own. To give every rank a full batch in an
        epoch's last round, Accelerate's `even_batches` completes them with examples from the epoch's start; they
        must count nothing, or they would weigh twice. Accelerate deals batch b of the epoch to rank
        b % processes, so slot j of this rank's micro-batch r holds example
        (r x processes + rank) x batch size + j of the epoch: those past the dataset's end are repeats."""
        processes, batch_size = self.accelerator.num_processes, self.recipe.training.per_device_batch_size
        first = (batch_in_epoch * processes + self.accelerator.process_index) * batch_size
        return torch.arange(first, first + len(example_token_ids(batch))) < len(self.train_loader.dataset)

    def optimizer_step(self, window: torch.Tensor, window_start: float) -> StepResult:
        """Clip, check for non-finite values (every rank sees the same reduced numbers), step or skip."""
        training = self.recipe.training
        totals = dict(zip(WINDOW_TOTALS, self.accelerator.reduce(window, reduction="sum").tolist()))
        items = totals["loss_items"]
        loss = totals["loss_sum"] / items if items else None
        grad_norm = None
        if items and training.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), training.max_grad_norm))
        finite = loss is None or (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)))
        if not finite and training.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"non-finite loss {loss} / grad norm {grad_norm} at optimizer step {self.position.optimizer_step + 1}; "
                "no checkpoint was written with these values. Lower training.lr, check the data, or set "
                "training.on_nonfinite_loss=skip"
            )
        if finite and items:
            self.optimizer.step()
            if not self.accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # .tolist() above waited for the device, so the clock covers the real work of this step.
        seconds = time.perf_counter() - window_start
        fingerprints = None
        if training.log_sample_fingerprints:
            fingerprints = gather_object(self.window_fingerprints)
            self.window_fingerprints = []
        return StepResult(loss, grad_norm, not finite, int(items), int(totals["samples"]), int(totals["real_tokens"]),
                          int(totals["padded_tokens"]), seconds, fingerprints)

    def after_step(self, result: StepResult) -> None:
        self.position.optimizer_step += 1
        step = self.position.optimizer_step
        lr = self.scheduler.get_last_lr()[0]
        self.position.samples_seen += result.samples
        self.reporter.advance(result.loss, lr, result.samples / result.seconds)
        empty = result.loss_items == 0
        if step % self.recipe.training.log_every_steps == 0 or result.skipped or empty:
            record = {
                "epoch": self.position.epoch, "loss": result.loss, "lr": lr, "loss_items": result.loss_items,
                "samples": result.samples,
                "real_tokens": result.real_tokens, "padded_tokens": result.padded_tokens, "step_seconds": result.seconds,
            }
            if result.grad_norm is not None:
                record["grad_norm"] = result.grad_norm
            if result.skipped:
                record["skipped_nonfinite"] = True
            if empty:
                record["empty_window"] = True
            if result.sample_fingerprints is not None:
                record["sample_fingerprints"] = result.sample_fingerprints
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
        """The task's loss and metrics over the whole eval set, exact across processes, then what it writes beside."""
        if self.eval_loader is None or self.position.optimizer_step == self.last_eval_step:
            return self.final_metrics  # evaluation.every_steps may already have landed on this epoch end
        self.model.eval()
        evaluation = self.task.evaluate(self.model, self.eval_loader, self.accelerator)
        self.task.report(evaluation, self.model, self.accelerator, self.position.optimizer_step, Path(self.recipe.output.dir))
        metrics = evaluation.metrics
        self.model.train()
        self.reporter.log("eval", self.position.optimizer_step,
                          {"epoch": self.position.epoch, **metrics, **self.peak_device_memory()})
        self.final_metrics = metrics
        self.last_eval_step = self.position.optimizer_step
        return metrics

    def peak_device_memory(self) -> dict[str, int]:
        """The largest allocator high-water mark over all ranks so far (for the log; nothing on CPU)."""
        peak = peak_allocated_bytes(self.accelerator.device.type)
        if peak is None:
            return {}
        peaks = self.accelerator.gather(torch.tensor([peak], dtype=torch.int64, device=self.accelerator.device))
        return {"peak_device_memory_bytes": int(peaks.max())}

    def save_checkpoint(self) -> None:
        if self.position.optimizer_step == self.last_saved_step:
            return
        self.check_weights_finite()
        started = time.perf_counter()
        folder = self.checkpointer.save(self.position)
        cost = CheckpointCost(time.perf_counter() - started, folder_bytes(folder))
        self.checkpoint_saves.append(cost.record("save"))
        self.reporter.log("checkpoint", self.position.optimizer_step, self.checkpoint_saves[-1])
        self.last_saved_step = self.position.optimizer_step

    def check_weights_finite(self) -> None:
        """Refuse to checkpoint NaN/inf weights (a finite loss does not prove finite weights), on every rank alike."""
        local = any(not torch.isfinite(p).all() for p in self.model.parameters())
        bad = self.accelerator.reduce(torch.tensor(float(local), device=self.accelerator.device), reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"weights hold NaN/inf after optimizer step {self.position.optimizer_step}; they were not checkpointed "
                f"and the latest checkpoint stays {self.checkpointer.latest() or '(none)'}. Lower training.lr or set "
                "training.max_grad_norm"
            )
