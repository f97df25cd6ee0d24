"""The Accelerator for a recipe: precision, accumulation, collective backend and timeout, tracker choice.

Also the two guards of a multi-process launch: processes that would silently train N independent copies
of the model are refused, and a DeepSpeed file that contradicts the recipe is refused; DeepSpeed's `auto`
values are filled from the recipe, the one source of batch, accumulation, clipping and precision.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from accelerate.utils import DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

from launcher.distributed.devices import DeviceInfo
from launcher.distributed.fsdp import complete_fsdp_on_cpu, fsdp_left_out_on_cpu, launched_fsdp_plugin
from launcher.recipe.schema import Precision, Recipe, TrainingSection
from launcher.train.reporting import tracker_for

CPU_LAUNCH_HINT = (
    "On a machine without GPUs/NPUs launch CPU processes explicitly: "
    "ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_ddp.yaml launcher/run.py RECIPE "
    "(or ACCELERATE_USE_CPU=true torchrun --nproc_per_node N launcher/run.py RECIPE)"
)


class LaunchError(RuntimeError):
    """The processes were started in a way that would not train one model together."""


class DeepSpeedConfigError(LaunchError):
    """The DeepSpeed config sets a value the recipe owns to something else."""


def launched_world_size() -> int:
    """Processes the launcher (accelerate launch / torchrun / srun) started, from the environment it sets."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(recipe: Recipe, precision: Precision, device: DeviceInfo) -> Accelerator:
    world_size = launched_world_size()
    check_local_processes(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
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
        # The trainer fetches each optimizer step's micro-batches together and marks where the window ends
        # (`TrainingLoop.forward_backward`), including the short last window of an epoch.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=recipe.training.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        kwargs_handlers=handlers,
        log_with=tracker_for(recipe.output.report_to),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,
    )
    if fsdp_left_out_on_cpu(accelerator):
        complete_fsdp_on_cpu(accelerator, fsdp2_plugin_for_cpu())
    check_one_training_group(accelerator, world_size, device)
    check_deepspeed_kept(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        problem = nonfinite_policy_problem(recipe.training)
        if problem:
            raise LaunchError(problem)
        plugin = accelerator.state.deepspeed_plugin
        reconcile_deepspeed_config(plugin.deepspeed_config, recipe.training, precision, world_size)
        # The HfDeepSpeedConfig that from_pretrained reads (ZeRO-3 init) is a copy: refresh it after filling.
        plugin.set_deepspeed_weakref()
    return accelerator


def fsdp2_plugin_for_cpu():
    """The launch's FSDP plugin, refused unless it is FSDP2: FSDP1 is not made to run on CPU processes."""
    plugin = launched_fsdp_plugin()
    if plugin.fsdp_version != 2:
        raise LaunchError(f"FSDP version {plugin.fsdp_version} on CPU processes: only FSDP2 runs there "
                          "(accelerate_configs/fsdp2.yaml); otherwise each process would train plain DDP")
    return plugin


def check_local_processes(device: DeviceInfo, local_processes: int) -> None:
    """Refuse more processes on this machine than accelerators it exposes: two processes would share a device
    (or fail deep inside the collective library) instead of saying so."""
    if device.type != "cpu" and local_processes > device.count:
        raise LaunchError(
            f"{local_processes} processes on this machine but {device.count} {device.type} device(s) are visible "
            f"({device.visibility()}): launch one process per device (--num_processes, or gpu_ids in the config)"
        )


def check_one_training_group(accelerator: Accelerator, world_size: int, device: DeviceInfo) -> None:
    """Refuse N processes that do not form one data-parallel group.

    Measured with Accelerate 1.15: `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs
    forms a 2-process gloo group (the backend we pass) but DistributedType.NO, so the model is never wrapped in
    DDP: each process trains its own copy on half the data and evaluates on half the eval set, and exits 0.
    """
    if world_size == 1:
        return
    if accelerator.num_processes == world_size and accelerator.distributed_type != DistributedType.NO:
        return
    hint = CPU_LAUNCH_HINT if device.type == "cpu" else f"check that every process sees its {device.type} device"
    raise LaunchError(
        f"{world_size} processes were launched but Accelerate formed a group of {accelerator.num_processes} "
        f"({accelerator.distributed_type}) on {device.type}: each process would train its own copy of the model. {hint}."
    )


def check_deepspeed_kept(accelerator: Accelerator) -> None:
    """Refuse a launch with a DeepSpeed config that Accelerate turned into something else. Measured with
    Accelerate 1.16: `ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/zero2.yaml` forms a
    MULTI_CPU group (plain DDP, or one plain process) and trains without ZeRO, saying nothing."""
    requested = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if requested and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise LaunchError(
            f"a DeepSpeed config was launched but Accelerate formed {accelerator.distributed_type}: it would train "
            "without ZeRO. On CPU processes set DS_ACCELERATOR=cpu and leave ACCELERATE_USE_CPU unset")


def optimizer_step_device(accelerator: Accelerator, device_type: str) -> str:
    """Where the optimizer steps: on the host when DeepSpeed offloads optimizer states (to CPU or NVMe through the
    CPU), else on the training device."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return device_type
    return "cpu" if optimizer_offloaded(accelerator.state.deepspeed_plugin.deepspeed_config) else device_type


def nonfinite_policy_problem(training: TrainingSection) -> Optional[str]:
    """Why `training.on_nonfinite_loss` cannot run under DeepSpeed, if it cannot. Accelerate's DeepSpeed wrapper
    steps the engine inside the backward of a window's last micro-batch, before the loop sees the step's loss: a
    skip decided then would keep the non-finite update and only hold back the schedule."""
    if training.on_nonfinite_loss != "skip":
        return None
    return ("training.on_nonfinite_loss=skip cannot skip a step under DeepSpeed (the engine updates the weights "
            "inside the backward, before the loss is known); set training.on_nonfinite_loss=stop, or train with "
            "DDP or FSDP")


def optimizer_offloaded(config: dict) -> bool:
    return config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"


def recipe_owned_deepspeed_values(training: TrainingSection, precision: Precision, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config keys (dotted) whose values the recipe decides, with the recipe's values.

    Accelerate fills some `auto`s itself, but `gradient_clipping` always as 1.0 whatever the recipe says, and it
    only warns (and lets DeepSpeed win) when accumulation differs; so all of them are filled and checked here.
    """
    micro_batch, accumulation = training.per_device_batch_size, training.gradient_accumulation_steps
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": training.max_grad_norm or 0.0,  # DeepSpeed reads 0 as "no clipping"
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
    }


def reconcile_deepspeed_config(config: dict, training: TrainingSection, precision: Precision, world_size: int) -> None:
    """Fill the recipe-owned values that are `auto` or absent, in place; raise on every one that contradicts
    the recipe, and on sections the recipe owns (optimizer, scheduler) or the export needs (ZeRO-3 gather)."""
    problems = []
    for dotted, wanted in recipe_owned_deepspeed_values(training, precision, world_size).items():
        *parents, key = dotted.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        value = node.get(key, "auto")
        if value == "auto":
            node[key] = wanted
        elif value != wanted:
            problems.append(f"{dotted} is {value!r} but the recipe gives {wanted!r}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            problems.append(f"`{section}` is set: the recipe's training section owns the optimizer and LR schedule")
    if optimizer_offloaded(config):
        # DeepSpeed refuses a torch optimizer under offload unless told otherwise, expecting it to be slow. The
        # launcher's is torch's fused AdamW stepping on the host: as fast as DeepSpeedCPUAdam (measured, docs/).
        if config.setdefault("zero_force_ds_cpu_optimizer", False):
            problems.append("zero_force_ds_cpu_optimizer is true: the launcher steps offloaded optimizer states with "
                            "torch's fused AdamW on the host (as fast as DeepSpeedCPUAdam); set it to false")
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        problems.append("zero_optimization.stage3_gather_16bit_weights_on_model_save must be true: the final "
                        "model is gathered from the ZeRO-3 shards into one file")
    if problems:
        raise DeepSpeedConfigError(
            "the DeepSpeed config contradicts the recipe (set these to \"auto\" and change the recipe instead):\n  - "
            + "\n  - ".join(problems)
        )
