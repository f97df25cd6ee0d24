"""Submit a recipe to Slurm: one batch job, or a job array for a sweep.

    python -m launcher.submit recipes/llama3_yelp.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00
    python -m launcher.submit recipes/llama3_yelp.yaml --nodes 2 --npus-per-node 8 --partition ascend
    python -m launcher.submit recipes/mrpc_bert.yaml --gpus-per-node 1 --array training.lr=1e-5,2e-5,5e-5
    python -m launcher.submit recipes/demo.yaml --cpus-per-task 2 training.epochs=1 --dry-run
    python -m launcher.submit recipes/demo.yaml --nodes 2 --cpu-processes-per-node 1   # DDP over gloo, no GPUs

Every recipe (each sweep task's too) is validated before anything is rendered, the cluster is asked whether it
can hold the job, then the script and the frozen recipes are written next to the outputs and sbatch is called.
Overrides (`section.key=value`) are the same as `launcher/run.py`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.cluster.slurm import (
    SLURM_FILES,
    BatchJob,
    Resources,
    SlurmError,
    check_cluster,
    render_script,
    sbatch,
    time_limit_seconds,
)
from launcher.recipe.loading import RecipeError, load_recipe
from launcher.recipe.schema import Recipe
from launcher.sweep import SweepError, SweepTask, expand, write_manifest
from launcher.train.run_directory import RunDirectoryError, check_run_directory, recipe_yaml

DEFAULT_ACCELERATE_CONFIG = {"gpu": "accelerate_configs/multi_node.yaml", "npu": "accelerate_configs/npu_ddp.yaml",
                             "cpu": "accelerate_configs/multi_node.yaml"}  # CPU processes: torchrun, gloo
RUN_SCRIPT = Path(__file__).resolve().with_name("run.py")
FROZEN_RECIPE = "recipe.yaml"
USER_ERRORS = (RecipeError, RunDirectoryError, SlurmError, SweepError)


@dataclass
class Submission:
    """The validated job: its script inputs, and one recipe and run directory per task."""

    job: BatchJob
    root: Path
    tasks: list[SweepTask]
    recipes: list[Recipe]
    run_dirs: list[Path]

    @property
    def script_path(self) -> Path:
        return self.root / SLURM_FILES / "job.sbatch"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.submit", description="Submit a recipe to Slurm as a batch job or a job array."
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides, as for run.py")
    where = parser.add_argument_group("resources (sbatch options of the same names)")
    where.add_argument("-N", "--nodes", type=int, default=1, metavar="N",
                       help="nodes; one `accelerate launch` runs on each")
    devices = where.add_mutually_exclusive_group()
    devices.add_argument("--gpus-per-node", type=int, metavar="G", help="CUDA GPUs per node; one training process each")
    devices.add_argument("--npus-per-node", type=int, metavar="G",
                         help="Ascend NPUs per node (gres npu); one training process each")
    devices.add_argument("--cpu-processes-per-node", type=int, metavar="P",
                         help="P CPU training processes per node, data parallel over gloo (CPU clusters, tests)")
    where.add_argument("-c", "--cpus-per-task", type=int, metavar="N",
                       help="CPUs per node task (without GPUs/NPUs: the training process's threads)")
    where.add_argument("-p", "--partition", metavar="NAME", help="partition (default: the cluster's default partition)")
    where.add_argument("-t", "--time", metavar="TIME", help="time limit, e.g. 04:00:00")
    where.add_argument("-A", "--account")
    where.add_argument("-q", "--qos")
    where.add_argument("--mem", help="memory per node, e.g. 200G")
    where.add_argument("-J", "--job-name", metavar="NAME", help="job name (default: the recipe file's name)")
    sweep = parser.add_argument_group("sweeps")
    sweep.add_argument("--array", action="append", default=[], metavar="section.key=v1,v2",
                       help="sweep these values as a job array; repeat for a grid over several keys")
    sweep.add_argument("--max-running", type=int, metavar="K",
                       help="array tasks allowed to run at once (sbatch --array=...%%K)")
    launch = parser.add_argument_group("launch")
    launch.add_argument("--accelerate-config", type=Path, metavar="PATH",
                        help="accelerate config of the topology (default: accelerate_configs/multi_node.yaml for "
                             "GPUs and CPU processes, accelerate_configs/npu_ddp.yaml for NPUs, none for one CPU "
                             "process)")
    launch.add_argument("--signal-time", type=int, default=300, metavar="SECONDS",
                        help="ask for USR1 this long before the time limit to checkpoint and requeue (default 300)")
    launch.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="export this in the job, e.g. NCCL_SOCKET_IFNAME=ib0; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; write and submit nothing")
    args = parser.parse_intermixed_args(argv)
    check_arguments(parser, args)
    return args


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    counts = {"--nodes": args.nodes, "--gpus-per-node": args.gpus_per_node, "--npus-per-node": args.npus_per_node,
              "--cpu-processes-per-node": args.cpu_processes_per_node, "--cpus-per-task": args.cpus_per_task,
              "--max-running": args.max_running}
    for option, value in counts.items():
        if value is not None and value < 1:
            parser.error(f"{option} must be at least 1")
    if args.nodes > 1 and args.gpus_per_node is None and args.npus_per_node is None and not args.cpu_processes_per_node:
        parser.error("a CPU job without --cpu-processes-per-node runs one process on one node: drop --nodes, or "
                     "add --gpus-per-node / --npus-per-node, or --cpu-processes-per-node for DDP over gloo")
    if any("=" not in entry for entry in args.env):
        parser.error("--env takes NAME=VALUE")
    try:
        limit = time_limit_seconds(args.time) if args.time is not None else None
    except SlurmError as err:
        parser.error(str(err))
    if limit is not None and args.signal_time >= limit:
        parser.error(f"--signal-time {args.signal_time} s is not shorter than --time {args.time}: the job would be "
                     "asked to checkpoint and requeue as soon as it starts; lower --signal-time")


def resources_from(args: argparse.Namespace) -> Resources:
    if args.gpus_per_node:
        device, count = "gpu", args.gpus_per_node
    elif args.npus_per_node:
        device, count = "npu", args.npus_per_node
    else:
        device, count = "cpu", args.cpu_processes_per_node or 0
    return Resources(args.nodes, device, count, args.cpus_per_task, args.partition, args.time,
                     args.account, args.qos, args.mem)


def load_task_recipes(args: argparse.Namespace, tasks: list[SweepTask], root: str) -> list[Recipe]:
    """Each task's recipe, output dir included; every task's problems are gathered into one error."""
    recipes, problems = [], []
    for task in tasks:
        # JSON quoting keeps the folder a YAML string whatever the swept values look like.
        output_dir = "output.dir=" + json.dumps(str(Path(root) / task.slug))
        try:
            recipes.append(load_recipe(args.recipe, [*args.overrides, *task.overrides, output_dir]))
        except RecipeError as err:
            problems += [f"array task {task.index} ({' '.join(task.overrides)}): {p}" for p in err.problems]
    if problems:
        raise RecipeError(args.recipe, problems)
    return recipes


def accelerate_config(args: argparse.Namespace, resources: Resources) -> Optional[Path]:
    default = None if resources.single_cpu_process else Path(DEFAULT_ACCELERATE_CONFIG[resources.device])
    path = args.accelerate_config or default
    if path is not None and not path.is_file():
        raise SlurmError(f"accelerate config {path} not found: pass --accelerate-config PATH")
    return path.resolve() if path is not None else None


def plan(args: argparse.Namespace) -> Submission:
    """Validate everything that can be checked without the cluster and assemble the job."""
    base = load_recipe(args.recipe, args.overrides)
    tasks = expand(args.array) if args.array else []
    recipes = load_task_recipes(args, tasks, base.output.dir) if tasks else [base]
    for recipe in recipes:
        check_run_directory(recipe)
    root = Path(base.output.dir).resolve()
    resources = resources_from(args)
    run_dirs = [Path(recipe.output.dir).resolve() for recipe in recipes]
    job = BatchJob(
        name=args.job_name or Path(args.recipe).stem,
        resources=resources,
        run_recipes=[run_dir / SLURM_FILES / FROZEN_RECIPE for run_dir in run_dirs],
        array=bool(tasks),
        log_dir=root / SLURM_FILES / "logs",
        workdir=Path.cwd(),
        python=sys.executable,
        run_script=RUN_SCRIPT,
        accelerate_config=accelerate_config(args, resources),
        signal_seconds=args.signal_time,
        collective_timeout_s=max(recipe.training.collective_timeout_s for recipe in recipes),
        max_running=args.max_running,
        env=dict(entry.split("=", 1) for entry in args.env),
    )
    return Submission(job, root, tasks, recipes, run_dirs)


def write_files(submission: Submission, script: str) -> None:
    """The script, the log folder, each task's frozen recipe and a sweep's task list, next to the outputs."""
    submission.job.log_dir.mkdir(parents=True, exist_ok=True)
    submission.script_path.write_text(script, encoding="utf-8")
    for recipe, path in zip(submission.recipes, submission.job.run_recipes):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(recipe_yaml(recipe), encoding="utf-8")
    if submission.tasks:
        write_manifest(submission.root, submission.tasks, submission.run_dirs)


def report(submission: Submission, job_id: str, partition: str) -> None:
    job = submission.job
    what = f"job array of {len(submission.tasks)} tasks" if job.array else "batch job"
    log = job.log_pattern.replace("%x", job.name).replace("%A", job_id).replace("%j", job_id).replace("%a", "<task>")
    print(f"submitted {what} {job_id} to partition {partition}")
    print(f"  script  : {submission.script_path}")
    print(f"  logs    : {log}.out, {log}.err")
    for run_dir in submission.run_dirs:
        print(f"  outputs : {run_dir}")
    print(f"  follow  : squeue -j {job_id}; tail -f {log}.out")
    if job.array:
        print(f"  results : python -m launcher.sweep {submission.root}")


def submit(submission: Submission, script: str) -> None:
    partition = check_cluster(submission.job.resources)
    write_files(submission, script)
    job_id = sbatch(submission.script_path)
    report(submission, job_id, partition)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        submission = plan(args)
        script = render_script(submission.job)
        if args.dry_run:
            print(script, end="")
            return 0
        submit(submission, script)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
