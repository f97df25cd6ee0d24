"""Real multi-process runs through `accelerate launch`, and the tolerances they are compared with.

Tolerances: the runs differ only in float32 summation order (gradients all-reduced across 2 processes, or
accumulated over 2 micro-batches in one; micro-batches padded to their own longest example), a relative
error of about 1e-7 per step (measured: at most 1.2e-7 in weights after 8 steps). Adam normalises each update
by the gradient's own scale, so these errors do not grow through lr; 1e-5 on losses and weights is 100x the
measured drift and still 100x below a one-step change in the weights (lr 1e-3), so a wrong global batch,
a missing all-reduce or a skipped accumulation step all fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from launcher.train.reporting import read_metrics_log
from runs import REPO

TOLERANCE = 1e-5
CPU_DDP = {"ACCELERATE_USE_CPU": "true"}
CPU_DEEPSPEED = {"DS_ACCELERATOR": "cpu"}


def free_port() -> int:
    """A free TCP port: other test sessions on the machine may hold Accelerate's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, recipe: Path, env: dict[str, str], processes: int = 2,
           script: str = "launcher/run.py") -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG --num_processes 2 launcher/run.py RECIPE` from the repository root."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(processes),
        "--main_process_port", str(free_port()), script, str(recipe),
    ]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics_log(run_dir) if r["kind"] == "train"]


def assert_weights_close(folder: Path, reference: Path) -> None:
    """The saved model in `folder` equals the one in `reference` within TOLERANCE, tensor by tensor."""
    got, want = load_file(folder / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=TOLERANCE, msg=name)
