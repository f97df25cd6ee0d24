"""Submit a recipe to Slurm: one batch job, or a job array for a sweep.

    python -m launcher.submit recipes/llama3_yelp.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00
    python -m launcher.submit recipes/llama3_yelp.yaml --nodes 2 --npus-per-node 8 --partition ascend
    python -m launcher.submit recipes/mrpc_bert.yaml --gpus-per-node 1 --array training.lr=1e-5,2e-5,5e-5
    python -m launcher.submit recipes/demo.yaml --cpus-per-task 2 training.epochs=1 --dry-run
    python -m launcher.submit recipes/demo.yaml --nodes 2 --cpu-processes-per-node 1   # DDP over gloo, no GPUs

The command line of launcher/cluster/submission.py: every recipe (each sweep task's too) is validated before
anything is rendered, the cluster is asked whether it can hold the job, then the script and the frozen recipes are
written next to the outputs and sbatch is called. Overrides (`section.key=value`) are the same as `launcher/run.py`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from launcher.cluster.slurm import Resources, SlurmError, render_script, time_limit_seconds
from launcher.cluster.submission import Request, Submission, plan, submit
from launcher.cluster.sweeps import SweepError
from launcher.recipe.loading import RecipeError
from launcher.train.run_directory import RunDirectoryError

USER_ERRORS = (RecipeError, RunDirectoryError, SlurmError, SweepError)


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
    launch.add_argument("--prepare", action="store_true",
                        help="tokenize the data as the job's first step (launcher/prepare.py, once per node, once per "
                             "job on a shared data.cache_dir); the training processes then read it back")
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


def request_from(args: argparse.Namespace) -> Request:
    return Request(args.recipe, args.overrides, resources_from(args), args.array, args.max_running, args.job_name,
                   args.accelerate_config, args.signal_time, dict(entry.split("=", 1) for entry in args.env),
                   args.prepare)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        submission = plan(request_from(args))
        script = render_script(submission.job)
        if args.dry_run:
            print(script, end="")
            return 0
        partition, job_id = submit(submission, script)
        report(submission, job_id, partition)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
