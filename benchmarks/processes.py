"""Run one benchmark child process and watch its peak resident memory from outside."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil

POLL_SECONDS = 0.2


@dataclass
class ChildResult:
    returncode: int
    wall_seconds: float
    peak_rss_bytes: int
    peak_anonymous_bytes: int
    """Peak of RSS less its file-backed and shared pages: what the kernel cannot reclaim (memory-mapped Arrow
    files count in RSS once touched, but are clean pages of the page cache)."""


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """(resident, anonymous resident) memory of a process and all its descendants (all ranks under
    `accelerate launch` / torchrun)."""
    rss = anonymous = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            memory = member.memory_info()
        except psutil.NoSuchProcess:
            continue
        rss += memory.rss
        anonymous += memory.rss - memory.shared
    return rss, anonymous


class PeakRss:
    """Polls a process tree's memory in a thread; keeps the maxima."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = self.peak_anonymous = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self) -> None:
        while not self.done.is_set():
            try:
                rss, anonymous = tree_memory(self.process)
            except psutil.NoSuchProcess:
                return
            self.peak, self.peak_anonymous = max(self.peak, rss), max(self.peak_anonymous, anonymous)
            self.done.wait(POLL_SECONDS)

    def __enter__(self) -> "PeakRss":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def run_child(command: list[str], env: dict[str, str], log_path: Path, timeout_s: float,
              until: Optional[Callable[[], bool]] = None) -> ChildResult:
    """Run `command` with its output in `log_path`; kill it (and wait) past `timeout_s`, or as soon as `until()`
    holds (the wall time is then the time until it held, the return code -9)."""
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with PeakRss(child.pid) as memory:
            deadline = started + timeout_s
            while child.poll() is None and time.perf_counter() < deadline and not (until and until()):
                time.sleep(POLL_SECONDS / 4)
            wall = time.perf_counter() - started
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)  # the whole tree: every rank under torchrun
            returncode = child.wait()
    return ChildResult(returncode, wall, memory.peak, memory.peak_anonymous)
