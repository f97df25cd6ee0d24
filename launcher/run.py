"""Fine-tune a model from a recipe.

    accelerate launch launcher/run.py recipes/yelp_bert.yaml [section.key=value ...]
    python launcher/run.py recipes/demo.yaml                 # one process, no accelerate config
    python launcher/run.py recipes/llama3_yelp.yaml --check  # validate and print the plan, train nothing

Reads as setup -> train -> cleanup. Exit codes: 0 done, 1 error, 3 stopped by a signal at a checkpoint
(resume with output.resume_from=auto).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # `accelerate launch launcher/run.py` runs this file as a script: put the repository root, not
    # launcher/, on the path so `launcher` imports as a package and its modules shadow nothing.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import time
from dataclasses import dataclass
from typing import Optional

from accelerate import Accelerator
from accelerate.utils import set_seed

from launcher.data.loaders import build_dataloaders
from launcher.data.sources import DataError
from launcher.distributed.accelerator import LaunchError, build_accelerator, launched_world_size, optimizer_step_device
from launcher.distributed.devices import PrecisionError, detect_device, precision_note, resolve_precision
from launcher.distributed.host_memory import keep_freed_host_memory
from launcher.distributed.library_messages import name_deepspeed_accelerator
from launcher.model.loading import ModelError, check_max_length, count_parameters, export_model, load_model, load_tokenizer
from launcher.plan.memory import Topology, load_topology
from launcher.plan.preflight import RunPlan, check_recipe
from launcher.recipe.loading import RecipeError, load_recipe
from launcher.recipe.schema import Recipe
from launcher.tasks import prepare_task_once
from launcher.train.checkpoints import CheckpointCost, CheckpointError, Checkpointer, TrainPosition, run_identity
from launcher.train.curves import write_curves
from launcher.train.elastic import plan_resume
from launcher.train.loop import CollectiveError, NonFiniteLossError, TrainingLoop
from launcher.train.optimization import build_optimizer, build_scheduler
from launcher.train.run_directory import (
    RunDirectoryError,
    check_run_directory,
    prepare_run_directory,
    recipe_sha256,
    write_run_summary,
)
from launcher.train.stopping import EXIT_STOPPED_FOR_RESUME, StoppedOnEveryRank, StopRequest

USER_ERRORS = (RecipeError, DataError, ModelError, PrecisionError, LaunchError, RunDirectoryError, CheckpointError,
               NonFiniteLossError, CollectiveError)


@dataclass
class Session:
    recipe: Recipe
    accelerator: Accelerator
    trainer: TrainingLoop
    tokenizer: object
    started: float
    loaded: Optional[CheckpointCost]
    """What reading the checkpoint it resumed from cost, if it resumed."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune a Hugging Face model from a recipe.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides, typed by the schema")
    parser.add_argument("--check", action="store_true", help="validate the recipe and data, print the plan, exit 0/1")
    parser.add_argument(
        "--processes", type=int, default=None,
        help="with --check: plan for this many processes (default: the --accelerate-config's, else this launch)"
    )
    parser.add_argument("--accelerate-config", default=None, metavar="FILE",
                        help="with --check: plan memory for this accelerate_configs/ topology (DDP, ZeRO stage, offload, FSDP)")
    parser.add_argument("--device-memory-gib", type=float, default=None, metavar="GIB",
                        help="with --check: memory of one device; the plan then says whether the run fits")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.check:
            return check(recipe, load_topology(args.accelerate_config, args.processes, args.device_memory_gib))
        session = setup(recipe)
        finished = train(session)
        return cleanup(session, finished)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def check(recipe: Recipe, topology: Topology) -> int:
    plan, problems = check_recipe(recipe, topology, detect_device())
    print(plan.describe())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print("check: " + ("FAILED" if problems else "ok"))
    return 1 if problems else 0


def setup(recipe: Recipe) -> Session:
    started = time.time()
    # Installed first: a preemption warning that lands while the model loads still stops at the first step.
    stop_request = StopRequest()
    stop_request.install()
    host_memory = keep_freed_host_memory() if recipe.training.reuse_host_memory else "host memory: system allocator defaults"
    device = detect_device()
    name_deepspeed_accelerator(device)
    precision = resolve_precision(device, recipe.training.precision, recipe.training.precision_fallback)
    check_run_directory(recipe)
    tokenizer = load_tokenizer(recipe.model)
    check_max_length(recipe, tokenizer)
    # Before the process group exists: a rank waiting for another's tokenization waits on a file lock, not
    # inside a collective that training.collective_timeout_s would end.
    prepared, preparation = prepare_task_once(recipe, tokenizer)
    resume_plan = plan_resume(recipe, launched_world_size())  # before the Accelerator takes its accumulation
    recipe = resume_plan.recipe
    accelerator = build_accelerator(recipe, precision, device)
    task, tokenized = prepared.task, prepared.data
    identity = run_identity(recipe, accelerator.num_processes, len(tokenized.train))
    # Before any collective: resharding a checkpoint for another world size can take long, and every rank but the
    # one doing it waits on a file lock meanwhile.
    resume_state = resume_plan.state_for(accelerator, identity)
    run_dir = prepare_run_directory(recipe, accelerator.is_main_process)
    if accelerator.log_with:
        accelerator.init_trackers("launcher")
    set_seed(recipe.training.seed)

    train_loader, eval_loader = build_dataloaders(tokenized, recipe, *task.collators(), task.class_ids(tokenized.train))
    model, load_notes = load_model(recipe, task, tokenizer)
    if recipe.training.compile:
        model.compile()  # in place: parameter names and state_dict keys stay those of the plain model
    optimizer = build_optimizer(model, recipe.training, optimizer_step_device(accelerator, device.type))
    total_steps = identity["total_steps"]
    scheduler = build_scheduler(optimizer, recipe.training, total_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    accelerator.register_for_checkpointing(scheduler)

    checkpointer = Checkpointer(accelerator, run_dir, recipe.output.keep_last, identity)
    position = TrainPosition()
    loaded = resume_plan.load(checkpointer, position, resume_state)

    plan = RunPlan(recipe, accelerator.num_processes, device.type, str(accelerator.distributed_type), precision,
                   len(tokenized.train), len(tokenized.eval) if tokenized.eval is not None else None)
    trainable, total = count_parameters(model)
    plan.notes += [f"parameters: {trainable:,} trainable of {total:,}", host_memory, preparation.note(), *prepared.notes, *load_notes]
    plan.notes += filter(None, [precision_note(device, precision)])
    plan.notes += resume_plan.notes
    plan.notes += filter(None, [resume_state and resume_state.note])
    if loaded is not None:
        plan.notes.append(f"resumed at optimizer step {position.optimizer_step} (epoch {position.epoch}, batch "
                          f"{position.batches_in_epoch}); checkpoint read: {loaded.describe()}")
    if accelerator.is_main_process:  # accelerator.print prints once per node: a multi-node log would repeat the plan
        print(plan.describe())

    trainer = TrainingLoop(recipe, accelerator, task, model, optimizer, scheduler, train_loader, eval_loader,
                      checkpointer, position, total_steps, stop_request)
    return Session(recipe, accelerator, trainer, tokenizer, started, loaded)


def train(session: Session) -> bool:
    try:
        return session.trainer.train()
    except StoppedOnEveryRank:
        # Every rank stops at this step: close the process group together, as a finished run does. A rank that
        # exits with gloo's process group open can abort in its worker threads (exit -6 instead of 1). Errors of
        # one rank alone leave it open: peers stuck in a collective would never reach the shutdown's barrier.
        shut_down(session.accelerator)
        raise


def cleanup(session: Session, finished: bool) -> int:
    trainer, accelerator = session.trainer, session.accelerator
    if not finished:
        accelerator.print(f"stopped by {', '.join(trainer.stop_request.received) or 'a peer rank'} at optimizer step "
                          f"{trainer.position.optimizer_step}; checkpoint written; resume with output.resume_from=auto")
        shut_down(accelerator)
        return EXIT_STOPPED_FOR_RESUME
    written = export_model(accelerator, trainer.model, session.tokenizer, session.recipe)
    if accelerator.is_main_process:
        summary = {
            "optimizer_steps": trainer.position.optimizer_step,
            "epochs_completed": trainer.position.epoch,
            "final_eval": trainer.final_metrics,
            "outputs": written,
            "wall_seconds": round(time.time() - session.started, 2),
            "recipe_sha256": recipe_sha256(session.recipe),
            "checkpoints": {"saves": trainer.checkpoint_saves,
                            "load": session.loaded.record("load") if session.loaded else None},
        }
        write_run_summary(Path(session.recipe.output.dir), summary)
        write_curves(session.recipe.output.dir)
        headline = {name: value for name, value in trainer.final_metrics.items() if isinstance(value, (int, float))}
        accelerator.print(f"done: {summary['optimizer_steps']} steps; final eval {headline}; outputs {written}")
    shut_down(accelerator)
    return 0


def shut_down(accelerator: Accelerator) -> None:
    """Close trackers and the process group once every rank got here: rank 0 hosts the rendezvous store,
    and a peer still tearing down after it left can hang at exit."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
