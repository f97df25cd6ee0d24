"""DeepSpeed ZeRO: optimizer state (and under ZeRO-3 the weights) partitioned by rank under `pytorch_model/`.

On another number of processes the partitions are converted once into DeepSpeed's universal checkpoint (its own
`ds_to_universal`: one folder of whole fp32 weights and optimizer moments per parameter) beside them, in
`universal/`, which DeepSpeed then reads with `checkpoint.load_universal` on any number of processes. The
conversion happens before any process group exists, under a file lock in the checkpoint (the first process to
take it converts, the others wait on the lock and read the result), and is written to a staging folder renamed
into place, so a conversion that was cut off is never read. A later resume from the same checkpoint reuses it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from filelock import FileLock

from launcher.data.preparation import usable_cores
from launcher.train.checkpoint_layouts.base import CheckpointLayout, StateSource
from launcher.train.checkpoints import MANIFEST, CheckpointError

TAG = "pytorch_model"
"""The tag (sub-folder) Accelerate's `save_state` gives DeepSpeed's `save_checkpoint`."""
UNIVERSAL = "universal"
CONVERSION = "conversion.json"
"""What the conversion took, recorded in the universal folder: the plan of every rank and later resume says it."""
LOAD_UNIVERSAL = {"checkpoint": {"load_universal": True}}


class DeepSpeedZero(CheckpointLayout):
    name = f"DeepSpeed ZeRO state partitioned by rank ({TAG}/)"

    def written_under(self, distributed_type: DistributedType) -> bool:
        return distributed_type == DistributedType.DEEPSPEED

    def holds(self, folder: Path) -> bool:
        return (folder / TAG).is_dir()

    def full_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)

    def state_for_world_size(self, folder: Path, saved_world: int, world: int) -> StateSource:
        universal = folder / UNIVERSAL
        with FileLock(str(folder / f"{UNIVERSAL}.lock")):  # no timeout: whoever holds it is converting
            if not universal.is_dir():
                convert_to_universal(folder, universal)
        seconds = json.loads((universal / CONVERSION).read_text())["seconds"]
        note = (f"DeepSpeed ZeRO state written by {saved_world} process(es) loads on {world} as a universal "
                f"checkpoint, converted once in {seconds:.1f} s ({universal}, read with checkpoint.load_universal)")
        return StateSource(universal, LOAD_UNIVERSAL, note)


def convert_to_universal(folder: Path, universal: Path) -> None:
    """`folder`'s ZeRO partitions as a universal checkpoint in `universal`, beside a copy of the files Accelerate's
    `load_state` reads there too (scheduler, random states)."""
    started = time.perf_counter()
    staging = universal.with_name(f".incomplete-{UNIVERSAL}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a conversion that was cut off
    staging.mkdir()
    workers = str(usable_cores())
    # --inject_missing_state: Hugging Face models carry none of the Megatron parallelism metadata the tool
    # otherwise requires; with one tensor- and pipeline-parallel rank there is nothing for it to describe.
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder / TAG),
               "--output_folder", str(staging / TAG), "--inject_missing_state",
               "--num_extract_workers", workers, "--num_merge_workers", workers]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckpointError(f"{folder}: DeepSpeed's ds_to_universal could not convert its ZeRO state for another "
                              f"number of processes (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    for path in folder.iterdir():
        if path.is_file() and path.name != MANIFEST and path.suffix != ".lock":
            shutil.copy2(path, staging / path.name)
    (staging / CONVERSION).write_text(json.dumps({"seconds": time.perf_counter() - started}))
    staging.rename(universal)
