"""The training loop without per-step host synchronisation at the optimizer step: the change proposed for
launcher/train/loop.py, run as a benchmark variant so that its worth is measured before the loop changes.

    python benchmarks/device/deferred_sync.py RECIPE [section.key=value ...]   # the arguments of launcher/run.py

Every optimizer step, the launcher's loop reads the reduced counters back (`.tolist()`), converts the gradient
norm to a float and agrees on the stop flag with an all-reduce read back by `.item()`. Each read-back waits until
the GPU has finished everything queued, so the host cannot queue step n+1 (nor collate its batch) while step n
runs. This variant keeps the launcher's loop and its forward/backward, and changes only that:

- the step's counters and gradient norm stay on the device; the optimizer and scheduler step unconditionally;
- every `DEFERRED_SYNC_EVERY` optimizer steps (environment; default `training.log_every_steps`), before any
  evaluation or checkpoint and at the end of an epoch, one reduce and one read-back give each pending step its
  record. A record's `step_seconds` is the window's time over its steps (one step's own time is not observable
  without a sync);
- the non-finite check and the stop flag are read there: a NaN still ends the run naming its step before any
  checkpoint (checkpoints check the weights too); a stop signal is honoured within that many steps;
- with `DEFERRED_SYNC_PINNED=1`, training batches are also pinned and copied to the device without blocking
  (Accelerate's default batch copy waits for the device).

What it leaves: the waits inside the launcher's forward/backward (each micro-batch's counters built from Python
ints, a synchronous host-to-device copy; the all-reduced loss-item count read by `.item()`), so the measured gain
is a lower bound of the full change. Steps that need the host's verdict before the optimizer runs keep the
launcher's own step: `on_nonfinite_loss: skip`, fp16 loss scaling (the scaler reads its overflow flag every step),
`log_sample_fingerprints`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: the repository root, as run.py does

import torch  # noqa: E402

import launcher.run  # noqa: E402
from launcher.recipe.schema import Recipe  # noqa: E402
from launcher.train.loop import NonFiniteLossError, StepResult, TrainingLoop  # noqa: E402

EVERY_VARIABLE = "DEFERRED_SYNC_EVERY"
PINNED_VARIABLE = "DEFERRED_SYNC_PINNED"


@dataclass
class PendingStep:
    """An optimizer step whose numbers are still on the device."""

    counts: torch.Tensor  # this rank's (loss sum, loss items, samples, real tokens, padded tokens), as forward_backward gives
    grad_norm: Optional[torch.Tensor]
    lr: float


def deferrable(recipe: Recipe) -> bool:
    training = recipe.training
    return training.on_nonfinite_loss == "stop" and training.precision != "fp16" and not training.log_sample_fingerprints


class DeferredStop:
    """The run's stop request, agreed on (a collective and a read-back) only where no step is pending."""

    def __init__(self, request, trainer: "DeferredSyncLoop"):
        self.request, self.trainer = request, trainer

    def agreed(self, accelerator) -> bool:
        return not self.trainer.pending and self.request.agreed(accelerator)

    def __getattr__(self, name):
        return getattr(self.request, name)


class DeferredSyncLoop(TrainingLoop):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_back_every = int(os.environ.get(EVERY_VARIABLE, self.recipe.training.log_every_steps))
        self.pending: list[PendingStep] = []
        self.window_start = time.perf_counter()
        if deferrable(self.recipe):
            self.stop_request = DeferredStop(self.stop_request, self)

    def optimizer_step(self, window: torch.Tensor, window_start: float) -> Optional[StepResult]:
        """Clip, step and schedule without reading anything back; the record comes at the next read-back."""
        if not deferrable(self.recipe):
            return super().optimizer_step(window, window_start)
        if not self.pending:
            self.window_start = window_start
        max_norm = self.recipe.training.max_grad_norm
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm) if max_norm is not None else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.append(PendingStep(window, None if grad_norm is None else torch.as_tensor(grad_norm),
                                        self.scheduler.get_last_lr()[0]))
        return None

    def after_step(self, result: Optional[StepResult]) -> None:
        if result is not None:
            return super().after_step(result)
        if self.read_back_due():
            self.read_back()

    def end_epoch(self) -> None:
        self.read_back()
        super().end_epoch()

    def read_back_due(self) -> bool:
        step = self.position.optimizer_step + len(self.pending)
        marks = (self.read_back_every, self.recipe.evaluation.every_steps, self.recipe.output.save_every_steps)
        return step >= self.total_steps or any(every and step % every == 0 for every in marks)

    def read_back(self) -> None:
        """One reduce and one device-to-host copy for all pending steps; then their records, in order."""
        if not self.pending:
            return
        rows = self.accelerator.reduce(torch.stack([p.counts for p in self.pending]), reduction="sum").tolist()
        norms = [None if p.grad_norm is None else float(p.grad_norm) for p in self.pending]
        seconds = (time.perf_counter() - self.window_start) / len(self.pending)
        pending, self.pending = self.pending, []
        for step, (loss_sum, items, samples, real, padded), grad_norm in zip(pending, rows, norms):
            loss = loss_sum / items
            if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
                raise NonFiniteLossError(f"non-finite loss {loss} / grad norm {grad_norm} at optimizer step "
                                         f"{self.position.optimizer_step + 1}; no checkpoint was written with these values")
            self.log_step(StepResult(loss, grad_norm, False, int(items), int(samples), int(real), int(padded), seconds),
                          step.lr)

    def log_step(self, result: StepResult, lr: float) -> None:
        """The launcher's `after_step`, with the learning rate the step ran at (the scheduler has moved on since)."""
        current = self.scheduler._last_lr
        self.scheduler._last_lr = [lr]
        try:
            super().after_step(result)
        finally:
            self.scheduler._last_lr = current


def pin_training_batches(setup):
    """`launcher.run.setup`, then training batches pinned and copied without blocking (CUDA only)."""
    def pinned_setup(recipe):
        session = setup(recipe)
        loader = session.trainer.train_loader
        if session.accelerator.device.type == "cuda":
            loader.pin_memory = True
            loader._non_blocking = True
        return session
    return pinned_setup


def main(argv: Optional[list[str]] = None) -> int:
    launcher.run.TrainingLoop = DeferredSyncLoop
    if os.environ.get(PINNED_VARIABLE) == "1":
        launcher.run.setup = pin_training_batches(launcher.run.setup)
    return launcher.run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
