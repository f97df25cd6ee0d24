"""Run one benchmark child process and watch its peak resident memory from outside."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL_SECONDS = 0.2


@dataclass
class ChildResult:
    returncode: int
    wall_seconds: float
    peak_rss_bytes: int


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all its descendants (all ranks under `accelerate launch` / torchrun)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class PeakRss:
    """Polls a process tree's RSS in a thread; keeps the maximum."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, tree_rss(self.process))
            except psutil.NoSuchProcess:
                return
            self.done.wait(POLL_SECONDS)

    def __enter__(self) -> "PeakRss":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def run_child(command: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> ChildResult:
    """Run `command` with its output in `log_path`; kill it (and wait) past `timeout_s`."""
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        with PeakRss(child.pid) as memory:
            try:
                returncode = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                returncode = child.wait()
    return ChildResult(returncode, time.perf_counter() - started, memory.peak)
