"""Resuming on another number of processes, as the same run: a checkpoint written by W processes continues on
W' at the same global batch, every optimizer step holding exactly the examples it would have held.

Why the examples stay the same: the training order is defined globally. Each epoch the sampler draws one order
of all examples (from `training.seed` and the epoch alone) and cuts it into per-device batches; Accelerate deals
batch b x W + r to rank r as its b-th micro-batch, so optimizer step s holds batches s x A x W up to
(s + 1) x A x W whatever W is, as long as A x W (accumulation times processes) stays the same. On a resume with
another W the accumulation is therefore re-derived from the checkpoint's global batch, before the Accelerator is
built, and the position within the epoch is counted in global batches (`Checkpointer.load`).

What cannot carry over: the random generators of ranks that did not exist, or whose counterparts held other
batches (dropout masks then differ; runs without dropout are exact). DeepSpeed ZeRO and FSDP checkpoints hold
state partitioned by rank; resharding them is not implemented, and `Checkpointer.load` refuses them by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from launcher.recipe.schema import Recipe
from launcher.train.checkpoints import CHECKPOINTS, MANIFEST, CheckpointError, sealed_checkpoints


def launched_world_size() -> int:
    """The processes this launch started (torchrun and accelerate launch export WORLD_SIZE), known before any
    process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def checkpoint_to_resume(recipe: Recipe) -> Optional[Path]:
    """The checkpoint `output.resume_from` names (`auto`: the latest sealed one), or None for a fresh start."""
    source = recipe.output.resume_from
    if source is None:
        return None
    if source != "auto":
        return Path(source)
    done = sealed_checkpoints(Path(recipe.output.dir) / CHECKPOINTS)
    return done[-1] if done else None


def saved_identity(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / MANIFEST).read_text())["identity"]
    except (OSError, ValueError, KeyError):
        return None  # not a readable checkpoint: Checkpointer.load names the problem


def accumulation_for(global_batch: int, per_device: int, world_size: int) -> int:
    """The gradient accumulation that keeps `global_batch` on `world_size` processes, or a CheckpointError that
    names the numbers when none does."""
    accumulation, rest = divmod(global_batch, per_device * world_size)
    if rest or not accumulation:
        raise CheckpointError(
            f"the checkpoint's global batch {global_batch} cannot be kept on {world_size} process(es) of "
            f"{per_device} per device: no whole number of accumulation steps gives {global_batch}; resume on a "
            f"world size that divides {global_batch // per_device}, or change training.per_device_batch_size"
        )
    return accumulation


def fit_to_world_size(recipe: Recipe, world_size: int) -> tuple[Recipe, list[str]]:
    """The recipe to resume with on `world_size` processes, and what changed, for the plan."""
    folder = checkpoint_to_resume(recipe)
    identity = saved_identity(folder) if folder is not None else None
    if not identity or identity.get("world_size") in (None, world_size) or recipe.output.allow_changed_resume:
        return recipe, []
    training = recipe.training
    accumulation = accumulation_for(identity["global_batch"], training.per_device_batch_size, world_size)
    changed = recipe.model_copy(update={"training": training.model_copy(update={"gradient_accumulation_steps": accumulation})})
    note = (f"resume on {world_size} process(es), checkpoint written by {identity['world_size']}: gradient accumulation "
            f"{training.gradient_accumulation_steps} -> {accumulation} (per device {training.per_device_batch_size}) keeps "
            f"the global batch {identity['global_batch']}, so every step holds the same examples; ranks' random "
            "generators do not carry over (dropout masks differ)")
    return changed, [note]

