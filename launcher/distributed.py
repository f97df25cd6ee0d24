"""The Accelerator for a recipe: precision, accumulation, collective backend and timeout, tracker choice.

Also the guard against launches that would silently train N independent copies of the model.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

from launcher.devices import DeviceInfo
from launcher.recipe import Precision, Recipe
from launcher.reporting import tracker_for


class LaunchError(RuntimeError):
    """The processes were started in a way that would not train one model together."""


def launched_world_size() -> int:
    """Processes the launcher (accelerate launch / torchrun / srun) started, from the environment it sets."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(recipe: Recipe, precision: Precision, device: DeviceInfo) -> Accelerator:
    world_size = launched_world_size()
    handlers = []
    if world_size > 1:
        # Accelerate only picks gloo on CPU when launched with MPI; name the backend so torchrun-style
        # CPU launches form one process group. Passing it in a single process fails, hence the guard.
        handlers.append(
            InitProcessGroupKwargs(backend=device.backend, timeout=timedelta(seconds=recipe.training.collective_timeout_s))
        )
    run_dir = Path(recipe.output.dir)
    accelerator = Accelerator(
        mixed_precision="no" if precision == "fp32" else precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=recipe.training.gradient_accumulation_steps, sync_with_dataloader=True
        ),
        kwargs_handlers=handlers,
        log_with=tracker_for(recipe.output.report_to),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes != world_size:
        raise LaunchError(
            f"{world_size} processes were launched but Accelerate formed a group of {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train its own copy. On a machine without GPUs use "
            "a CPU config (accelerate_configs/cpu_ddp.yaml) or torchrun with ACCELERATE_USE_CPU=true."
        )
    return accelerator
