"""DeepSpeed ZeRO: optimizer state (and under ZeRO-3 the weights) partitioned by rank under `pytorch_model/`.

On another number of processes the partitions are converted once into DeepSpeed's universal checkpoint (its own
`ds_to_universal`: whole fp32 weights and optimizer moments, one folder per parameter) in `universal/` beside
them, which DeepSpeed then reads with `checkpoint.load_universal` on any number of processes. The conversion runs
after the Accelerator is built and before anything is prepared, under a file lock in the checkpoint: the first
process to take it converts, the others wait on the lock (not in a collective) and read the result. It is written
to a staging folder, fsynced and renamed into place, so a conversion that was cut off is never read; a later
resume from the same checkpoint reuses it. ZeRO-2 and ZeRO-3 are tested (2 -> 1 and 1 -> 2, and 2 -> 1).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from filelock import FileLock

from launcher.data.preparation import usable_cores
from launcher.train.checkpoint_layouts.base import CheckpointLayout, StateSource
from launcher.train.checkpoints import MANIFEST, CheckpointError, fsync_dir, fsync_tree

TAG = "pytorch_model"
"""The tag (sub-folder) Accelerate's `save_state` gives DeepSpeed's `save_checkpoint`."""
UNIVERSAL = "universal"
CONVERSION = "conversion.json"
"""What the conversion took, recorded in the universal folder: every rank's plan and every later resume say it."""


class DeepSpeedZero(CheckpointLayout):
    name = f"DeepSpeed ZeRO state partitioned by rank ({TAG}/)"

    def written_by(self, accelerator: Accelerator) -> bool:
        return accelerator.distributed_type == DistributedType.DEEPSPEED

    def holds(self, folder: Path) -> bool:
        return (folder / TAG).is_dir()

    def full_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)

    def resharded(self, folder: Path, saved_world: int, accelerator: Accelerator) -> StateSource:
        universal = folder / UNIVERSAL
        try:
            with FileLock(str(folder / f"{UNIVERSAL}.lock")):  # no timeout: whoever holds it is converting
                if not universal.is_dir():
                    convert_to_universal(folder, universal)
        except OSError as err:
            raise CheckpointError(f"{folder}: the universal checkpoint for another number of processes cannot be "
                                  f"written beside it ({err}); copy the checkpoint to a writable place and resume "
                                  "from there (output.resume_from=PATH)") from err
        # The engine reads this when it loads, after `prepare` built it from the same config.
        accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
        record = json.loads((universal / CONVERSION).read_text())
        return StateSource(universal, f"DeepSpeed ZeRO state written by {saved_world} process(es) loads on "
                                      f"{accelerator.num_processes} as a universal checkpoint, converted once in "
                                      f"{record['seconds']:.1f} s ({universal}, read with checkpoint.load_universal)")


def convert_to_universal(folder: Path, universal: Path) -> None:
    """`folder`'s ZeRO partitions as a universal checkpoint in `universal`, beside a copy of the files Accelerate's
    `load_state` reads there too (scheduler, random states)."""
    started = time.perf_counter()
    # Named for this process: should the lock not hold across nodes (some network file systems), two converters
    # never write into one folder, and the second rename finds the first one's result.
    staging = universal.with_name(f".incomplete-{UNIVERSAL}-{socket.gethostname()}-{os.getpid()}")
    staging.mkdir()
    # --inject_missing_state: Hugging Face models carry none of the Megatron parallelism metadata the tool
    # otherwise requires; with one tensor- and pipeline-parallel rank there is nothing for it to describe.
    # Merging keeps DeepSpeed's default number of workers: it holds whole parameters in memory.
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder / TAG),
               "--output_folder", str(staging / TAG), "--inject_missing_state",
               "--num_extract_workers", str(usable_cores())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"{folder}: DeepSpeed's ds_to_universal could not convert its ZeRO state for another "
                              f"number of processes (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    for path in folder.iterdir():
        if path.is_file() and path.name != MANIFEST and path.suffix != ".lock":
            shutil.copy2(path, staging / path.name)
    (staging / CONVERSION).write_text(json.dumps({"seconds": time.perf_counter() - started}))
    fsync_tree(staging)
    try:
        staging.rename(universal)
    except OSError:
        if not universal.is_dir():
            raise
        shutil.rmtree(staging)  # another process converted first
    fsync_dir(folder)
