"""How a run resumes (`plan_resume`, then `ResumePlan`): the checkpoint `output.resume_from` names, verified, and,
on another number of processes, the same run: a checkpoint written by W processes continues on W' at the same
global batch, every optimizer step holding exactly the examples it would have held.

Why the examples stay the same: the training order is defined globally. Each epoch the sampler draws one order
of all examples (from `training.seed` and the epoch alone) and cuts it into per-device batches; Accelerate deals
batch b x W + r to rank r as its b-th micro-batch, so optimizer step s holds batches s x A x W up to
(s + 1) x A x W whatever W is, as long as A x W (accumulation times processes) stays the same. On a resume with
another W the accumulation is therefore re-derived from the checkpoint's global batch, before the Accelerator is
built, and the position within the epoch is counted in global batches (`Checkpointer.load`).

Model and optimizer state follow the checkpoint's layout (launcher/train/checkpoint_layouts/): whole state (one
process, DDP) and FSDP state load on any number of processes as they are; DeepSpeed ZeRO partitions are converted
once into DeepSpeed's universal checkpoint, after every refusal that can be made without them, and while no rank
is inside a collective.

What cannot carry over: the random generators of ranks that did not exist, or whose counterparts held other
batches (dropout masks then differ; runs without dropout are exact).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator

from launcher.recipe.schema import Recipe
from launcher.train.checkpoint_layouts import LAYOUTS, CheckpointLayout, StateSource, layout_of, layout_written_by
from launcher.train.checkpoints import (
    CHECKPOINTS,
    CheckpointCost,
    CheckpointError,
    Checkpointer,
    TrainPosition,
    check_identity,
    folder_bytes,
    sealed_checkpoints,
    verify_or_advise,
    world_size_of,
)


def checkpoint_to_resume(recipe: Recipe) -> Optional[Path]:
    """The checkpoint `output.resume_from` names (`auto`: the latest sealed one), or None for a fresh start."""
    source = recipe.output.resume_from
    if source is None:
        return None
    if source != "auto":
        return Path(source)
    done = sealed_checkpoints(Path(recipe.output.dir) / CHECKPOINTS)
    return done[-1] if done else None


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


def fit_to_world_size(recipe: Recipe, identity: dict[str, Any], world_size: int) -> tuple[Recipe, list[str]]:
    """The recipe to resume a checkpoint of run `identity` with on `world_size` processes, and what changed."""
    if recipe.output.allow_changed_resume:
        return recipe, []
    training = recipe.training
    accumulation = accumulation_for(identity["global_batch"], training.per_device_batch_size, world_size)
    changed = recipe.model_copy(update={"training": training.model_copy(update={"gradient_accumulation_steps": accumulation})})
    note = (f"resume on {world_size} process(es), checkpoint written by {identity['world_size']}: gradient accumulation "
            f"{training.gradient_accumulation_steps} -> {accumulation} (per device {training.per_device_batch_size}) keeps "
            f"the global batch {identity['global_batch']}, so every step holds the same examples; ranks' random "
            "generators do not carry over (dropout masks differ)")
    return changed, [note]


@dataclass(frozen=True)
class ResumePlan:
    """What a run continues from: decided before the Accelerator is built (`plan_resume`), checked against the run
    and resharded after it is built and before anything is prepared (`state_for`), loaded after (`load`)."""

    recipe: Recipe
    """The recipe to run: on another world size, with the accumulation that keeps the checkpoint's global batch."""
    checkpoint: Optional[Path] = None
    """The sealed checkpoint to continue, verified; None for a fresh start."""
    manifest: dict[str, Any] = field(default_factory=dict)
    layout: Optional[CheckpointLayout] = None
    notes: tuple[str, ...] = ()

    def state_for(self, accelerator: Accelerator, identity: dict[str, Any]) -> Optional[StateSource]:
        """Where the checkpoint's state loads from in the run of `accelerator` and `identity`, once every refusal
        that does not need the state has been made (other engine, other run), so none comes after a resharding."""
        if self.checkpoint is None:
            return None
        written_by_run = layout_written_by(accelerator)
        if self.layout is not None and written_by_run is not self.layout:
            wanted = written_by_run.name if written_by_run else "per-rank files"
            raise CheckpointError(f"{self.checkpoint} holds {self.layout.name}, but this run "
                                  f"({accelerator.distributed_type.value}) reads {wanted}: resume with the launch "
                                  "configuration that wrote it")
        if not self.recipe.output.allow_changed_resume:
            check_identity(self.checkpoint, self.manifest, identity)
        saved_world = world_size_of(self.manifest, accelerator.num_processes)
        if saved_world == accelerator.num_processes:
            return StateSource(self.checkpoint)
        if self.layout is None:
            raise CheckpointError(
                f"{self.checkpoint} was written by {saved_world} process(es) in none of the layouts this launcher "
                f"reshards ({'; '.join(known.name for known in LAYOUTS)}; per-rank files are not): resume on "
                f"{saved_world} process(es)")
        return self.layout.resharded(self.checkpoint, saved_world, accelerator)

    def load(self, checkpointer: Checkpointer, position: TrainPosition, state: Optional[StateSource]) -> Optional[CheckpointCost]:
        """Load the checkpoint from `state` into the prepared objects and `position`; what reading it cost (None:
        a fresh start)."""
        if state is None:
            return None
        started = time.perf_counter()
        checkpointer.load(self.checkpoint, self.manifest, state.folder, position, self.recipe.output.allow_changed_resume)
        return CheckpointCost(time.perf_counter() - started, folder_bytes(state.folder))


def plan_resume(recipe: Recipe, world_size: int) -> ResumePlan:
    """The checkpoint `output.resume_from` names, verified, with the recipe fitted to `world_size` processes."""
    folder = checkpoint_to_resume(recipe)
    if folder is None:
        return ResumePlan(recipe)
    if not folder.is_dir():
        raise CheckpointError(f"output.resume_from: {folder} is not a checkpoint folder")
    manifest = verify_or_advise(folder)
    saved_world = world_size_of(manifest, world_size)
    fitted, notes = (recipe, []) if saved_world == world_size else fit_to_world_size(recipe, manifest["identity"], world_size)
    return ResumePlan(fitted, folder, manifest, layout_of(folder), tuple(notes))
