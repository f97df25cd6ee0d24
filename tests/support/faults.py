"""Run the real entry point with one fault injected at an exact point, as the reliability tests need.

    python tests/support/faults.py FAULT STEP RANK -- RECIPE [overrides...]

FAULT is one of:
  none        no fault (the uninterrupted reference run, launched the same way)
  kill        SIGKILL this process right after optimizer step STEP (after any checkpoint of that step)
  kill_saving SIGKILL this process while checkpoint STEP is written, before it is sealed and renamed
  sigterm     send SIGTERM / SIGUSR1 to this process after step STEP (the real handler then runs)
  sigusr1
  hang        stop answering after step STEP: sleep in the training loop, never reaching the next collective
  fill_disk   fill the output directory's file system just before checkpoint STEP is written
  slow_prepare  take STEP seconds longer to prepare the data, when this process is the one preparing it
RANK is the rank the fault hits (others run unharmed); `all` hits every rank.

The faults are real (a kernel SIGKILL, a real signal, a full tmpfs); only *when* they happen is arranged,
by wrapping launcher methods, so the tests can compare against uninterrupted runs step for step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest  # noqa: E402
import torch  # noqa: E402

from launching import CPU_DDP, free_port  # noqa: E402

import launcher.tasks  # noqa: E402
from launcher.data.preparation import READY_MARKER  # noqa: E402
from launcher.train import checkpoints, loop  # noqa: E402
from launcher.run import main  # noqa: E402
from launcher.train.reporting import read_metrics_log  # noqa: E402

HARNESS = Path(__file__).resolve()
PROCESS_GROUP_LEFT_OPEN = "harness: the process group is still open at exit"
REPO = HARNESS.parents[2]


def fill_file_system(folder: Path) -> None:
    """Write a filler file until the file system refuses with ENOSPC."""
    with (folder / "filler.bin").open("wb") as handle:
        block = b"\0" * (1 << 16)
        try:
            while True:
                handle.write(block)
                handle.flush()
        except OSError:
            pass


def patches(fault: str, step: int) -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) triples that inject `fault` at `step`: the script applies them with
    setattr, in-process tests with pytest's monkeypatch (so they are undone)."""
    if fault == "none":
        return []
    if fault in ("kill", "sigterm", "sigusr1", "hang"):
        after_step = loop.TrainingLoop.after_step
        action = {
            "kill": lambda: os.kill(os.getpid(), signal.SIGKILL),
            "sigterm": lambda: os.kill(os.getpid(), signal.SIGTERM),
            "sigusr1": lambda: os.kill(os.getpid(), signal.SIGUSR1),
            "hang": lambda: time.sleep(3600),
        }[fault]

        def faulty_after_step(self, result):
            after_step(self, result)
            if self.position.optimizer_step == step:
                action()

        return [(loop.TrainingLoop, "after_step", faulty_after_step)]
    if fault == "kill_saving":
        seal = checkpoints.Checkpointer.seal

        def faulty_seal(self, staging, position):
            seal(self, staging, position)
            if position.optimizer_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

        return [(checkpoints.Checkpointer, "seal", faulty_seal)]
    if fault == "fill_disk":
        save = checkpoints.Checkpointer.save

        def save_on_full_disk(self, position):
            if position.optimizer_step == step:
                fill_file_system(self.root.parent)
            return save(self, position)

        return [(checkpoints.Checkpointer, "save", save_on_full_disk)]
    if fault == "slow_prepare":
        prepare = launcher.tasks.prepare_task

        def slow_prepare(recipe, tokenizer, splits=None, map_plan=None):
            if not (map_plan.folder / READY_MARKER).exists():  # this process holds the lock on a cold cache
                time.sleep(step)
            return prepare(recipe, tokenizer, splits, map_plan)

        return [(launcher.tasks, "prepare_task", slow_prepare)]
    raise SystemExit(f"unknown fault {fault!r}")


def faulty_command(fault: str, step: int, rank: str, recipe: Path, *overrides: str, processes: int = 1,
                   config: Optional[str] = None) -> list[str]:
    """The command line of a run with `fault`, as users launch it: with an accelerate `config` (DeepSpeed, FSDP)
    through `accelerate launch`; otherwise 2+ processes through torchrun (CPU, gloo), one as a plain script."""
    args = [str(HARNESS), fault, str(step), rank, "--", str(recipe), *overrides]
    if config is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                "--num_processes", str(processes), "--main_process_port", str(free_port()), *args]
    if processes == 1:
        return [sys.executable, *args]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", f"--nproc_per_node={processes}", *args]


def run_faulty(*args, processes: int = 1, timeout: int = 300, env: Optional[dict[str, str]] = None,
               **kwargs) -> subprocess.CompletedProcess:
    """`faulty_command` run to its end; `env` (default: CPU processes) joins the environment. DeepSpeed on CPU
    wants DS_ACCELERATOR=cpu instead: ACCELERATE_USE_CPU would make Accelerate form a plain MULTI_CPU group."""
    env = {**os.environ, **(CPU_DDP if env is None else env)}
    command = faulty_command(*args, processes=processes, **kwargs)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start_ranks(fault: str, step: int, rank: str, recipe: Path, *overrides: str, processes: int = 2) -> list[subprocess.Popen]:
    """Start the ranks by hand, with the environment torchrun gives them, so a test can watch and end each one
    itself (torchrun would wait 30 s before killing a rank that ignores its SIGTERM)."""
    port = free_port()
    ranks = []
    for index in range(processes):
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(processes),
               "LOCAL_WORLD_SIZE": str(processes), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, str(HARNESS), fault, str(step), rank, "--", str(recipe), *overrides]
        ranks.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return ranks


@pytest.fixture
def restore_signal_handlers():
    """In-process runs install the launcher's SIGTERM/SIGUSR1 handlers in pytest's process; put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def train_records(run_dir: Path) -> dict[int, dict]:
    """The last train record of each step: a resumed run appends, and re-logs the steps after its checkpoint."""
    return {r["step"]: r for r in read_metrics_log(run_dir) if r["kind"] == "train"}


def final_weights(run_dir: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"weights differ bit-wise: {different[:5]}"


if __name__ == "__main__":
    fault, step, rank, separator, *args = sys.argv[1:]
    assert separator == "--", __doc__
    if rank in ("all", os.environ.get("RANK", "0")):
        for owner, name, replacement in patches(fault, int(step)):
            setattr(owner, name, replacement)
    code = main(args)
    if torch.distributed.is_initialized():  # what the tests of clean shutdowns look for
        print(PROCESS_GROUP_LEFT_OPEN, file=sys.stderr)
    sys.exit(code)
