"""Graceful stop on SIGTERM / SIGUSR1 (Slurm's preemption warning): the handler only sets a flag; at the
next optimizer-step boundary all ranks agree, one checkpoint is written, and the run exits with
`EXIT_STOPPED_FOR_RESUME` so a wrapper (Slurm requeue) knows to start it again."""

from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator

# 0 is success and 1 an error; 3 says "stopped cleanly at a checkpoint, resume me" (BSD's EX_ range starts at 64).
EXIT_STOPPED_FOR_RESUME = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedOnEveryRank(RuntimeError):
    """An error every rank raises at the same step, decided on all-reduced values (a non-finite loss or weights, a
    checkpoint some rank failed to write): all ranks are still there to close the process group together."""


class StopRequest:
    """A flag set from a signal handler, read by the training loop at step boundaries."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.received: list[str] = []

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        self.received.append(signal.Signals(signum).name)
        self.requested.set()

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank when any rank was asked to stop (one all-reduce, so ranks never diverge)."""
        local = torch.tensor(1.0 if self.requested.is_set() else 0.0, device=accelerator.device)
        return bool(accelerator.reduce(local, reduction="sum").item() > 0)
