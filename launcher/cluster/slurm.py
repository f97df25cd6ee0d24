"""Slurm batch jobs: what a job asks for, the sbatch script that runs a recipe on it, and the cluster
queries that refuse impossible requests before anything is queued.

The script never reads YAML. Python freezes each run's resolved recipe into a file at submit time and
the script hands that file to `launcher/run.py` with `output.resume_from=auto`, so a requeued job
continues the same run even if the recipe file was edited meanwhile.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

DeviceKind = Literal["cpu", "gpu", "npu"]
SLURM_FILES = "slurm"  # inside each output dir: the script, the frozen recipe, the logs, a sweep's task list
# sinfo %G entries look like `gpu:8`, `gpu:a100:8(S:0-1)` or `(null)`.
GRES_ENTRY = re.compile(r"^(?P<name>[^:(]+)(?::[^:(]+)*:(?P<count>\d+)")
# How often the batch shell re-sends a forwarded stop: short against a time-limit warning of minutes.
STOP_REPEAT_SECONDS = 10
HCCL_EXEC_TIMEOUT_MAX = 17340  # seconds, the largest value every Ascend generation accepts (CANN env var reference)
TIME_LIMIT = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


class SlurmError(RuntimeError):
    """Slurm is not there, or the cluster cannot run what was asked."""


def time_limit_seconds(text: str) -> Optional[int]:
    """Seconds in a Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None for UNLIMITED."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = TIME_LIMIT.fullmatch(text)
    if match is None:
        raise SlurmError(f"--time {text!r} is not a Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)")
    days, first, second, third = (int(group) if group else None for group in match.groups())
    if days is not None:  # after a day count the clock starts with hours
        hours, minutes, seconds = first, second or 0, third or 0
    elif third is not None:
        hours, minutes, seconds = first, second, third
    else:  # without one it starts with minutes
        hours, minutes, seconds = 0, first, second or 0
    return (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(frozen=True)
class Resources:
    """What one job asks Slurm for. Accelerate starts one process per device on each node. A CPU job is one
    process on one node, or with `devices_per_node` CPU processes per node (DDP over gloo) on any number."""

    nodes: int
    device: DeviceKind
    devices_per_node: int
    cpus_per_task: Optional[int]
    partition: Optional[str]
    time: Optional[str]
    account: Optional[str] = None
    qos: Optional[str] = None
    mem: Optional[str] = None

    @property
    def processes_per_node(self) -> int:
        return self.devices_per_node or 1

    @property
    def single_cpu_process(self) -> bool:
        """Accelerate's plain CPU launch (`--cpu`): one process; several CPU processes go through torchrun."""
        return self.device == "cpu" and not self.devices_per_node

    @property
    def num_processes(self) -> int:
        return self.nodes * self.processes_per_node


@dataclass(frozen=True)
class BatchJob:
    """Everything the sbatch script is rendered from; `run_recipes` holds one frozen recipe per array task."""

    name: str
    resources: Resources
    run_recipes: list[Path]
    array: bool
    log_dir: Path
    workdir: Path
    python: str
    run_script: Path
    accelerate_config: Optional[Path]
    signal_seconds: int
    collective_timeout_s: int
    max_running: Optional[int] = None
    env: dict[str, str] = field(default_factory=dict)
    prepare_script: Optional[Path] = None
    """launcher/prepare.py, to run as the job's first step (`submit --prepare`); None: the training step prepares."""

    @property
    def log_pattern(self) -> str:
        """Per job, or per array task (`%A_%a`): requeued runs append to the same file (--open-mode=append)."""
        return str(self.log_dir / ("%x-%A_%a" if self.array else "%x-%j"))


def sbatch_directives(job: BatchJob) -> list[str]:
    r = job.resources
    options = [
        f"--job-name={job.name}",
        f"--nodes={r.nodes}",
        "--ntasks-per-node=1",  # one `accelerate launch` per node; it starts the per-device processes
        f"--chdir={job.workdir}",
        f"--output={job.log_pattern}.out",
        f"--error={job.log_pattern}.err",
        "--requeue",
        "--open-mode=append",
        f"--signal=B:USR1@{job.signal_seconds}",
    ]
    if r.device != "cpu":
        # GPUs have first-class sbatch options; Ascend sites declare NPUs as a generic resource (Gres=npu:8).
        per_node = f"--gpus-per-node={r.devices_per_node}" if r.device == "gpu" else f"--gres=npu:{r.devices_per_node}"
        options.append(per_node)
    optional = {"cpus-per-task": r.cpus_per_task, "partition": r.partition, "time": r.time,
                "account": r.account, "qos": r.qos, "mem": r.mem}
    options += [f"--{name}={value}" for name, value in optional.items() if value is not None]
    if job.array:
        throttle = f"%{job.max_running}" if job.max_running else ""
        options.append(f"--array=0-{len(job.run_recipes) - 1}{throttle}")
    return [f"#SBATCH {option}" for option in options]


def device_environment(job: BatchJob) -> dict[str, str]:
    """Collective-library settings per device kind; `--env` entries from the user win (the network interface
    of a multi-homed node, for example: NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, HCCL_SOCKET_IFNAME)."""
    r = job.resources
    if r.device == "gpu":
        # A collective that exceeds the recipe's training.collective_timeout_s (the process group's timeout)
        # then raises on every rank instead of hanging; a rank that dies makes the others raise too.
        env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}
    elif r.device == "npu":
        env = {
            "ASCEND_RT_VISIBLE_DEVICES": ",".join(str(i) for i in range(r.devices_per_node)),
            # Multi-node HCCL link set-up can exceed the 120 s default on a busy fabric.
            "HCCL_CONNECT_TIMEOUT": "1200",
            # HCCL's own per-collective limit: as long as the recipe's, so a rank still tokenizing (the others
            # wait for rank 0 in a barrier) is not declared dead by HCCL before the process group would. CANN
            # accepts at most 17340 s on Atlas training (910A) chips; A2/A3 accept more.
            "HCCL_EXEC_TIMEOUT": str(min(job.collective_timeout_s, HCCL_EXEC_TIMEOUT_MAX)),
        }
    elif r.devices_per_node:
        env = {"ACCELERATE_USE_CPU": "true"}  # the torchrun path forms a CPU (gloo) group only when told so
    else:
        env = {}
    if r.cpus_per_task:
        env["OMP_NUM_THREADS"] = str(max(1, r.cpus_per_task // r.processes_per_node))
    return {**env, **job.env}


def launch_arguments(job: BatchJob) -> list[str]:
    """`accelerate launch` options, one per line: static values quoted, per-node ones read from Slurm at run time."""
    r = job.resources
    lines = []
    if job.accelerate_config is not None:
        lines.append(f"--config_file {shlex.quote(str(job.accelerate_config))}")
    if r.single_cpu_process:
        lines.append("--cpu")
    return lines + [
        '--num_machines "$SLURM_NNODES"',
        '--machine_rank "$SLURM_NODEID"',  # one task per node, so the node index is the machine rank
        f"--num_processes {r.num_processes}",
        '--main_process_ip "$MAIN_HOST"',
        '--main_process_port "$MAIN_PORT"',
    ]


SCRIPT_BODY = r"""
# Rendered by `python -m launcher.submit`. Python resolved the recipe; this script reads no YAML.
set -uo pipefail

# Slurm's warning (--signal=B:USR1@N, or `scancel --batch --signal=USR1`) reaches only this shell: pass it on
# to every process of the training step (plain `scancel --signal` skips the batch shell itself). Processes still
# loading the model ignore USR1 until their handler is installed, so repeat it until the step ends. A task only
# ignores USR1 once its shell has set the trap (launch_on_node): the warning is passed on once every node's task
# has said so, since one landing earlier would end that task (and a data-preparing step) on the spot.
export STARTED_DIR={started_dir}
started_prefix="$SLURM_JOB_ID.${{SLURM_RESTART_COUNT:-0}}."
mkdir -p "$STARTED_DIR"
stop_requested=0
forward_stop() {{
  [ "$stop_requested" = 1 ] && return
  stop_requested=1
  echo "preemption warning: asking the training processes to checkpoint and stop"
  while :; do
    started=$(find "$STARTED_DIR" -name "$started_prefix*" | wc -l)
    [ "$started" -ge "$SLURM_JOB_NUM_NODES" ] && scancel --signal=USR1 "$SLURM_JOB_ID"
    sleep {repeat_seconds}
  done &
  repeater=$!
}}
trap forward_stop USR1

# Collective settings (why: docs/clusters.md, "Settings multi-node jobs need"). The process group's timeout is the
# recipe's training.collective_timeout_s; the network interface, where nodes have several, comes from --env.
{exports}
export PYTHON={python}
TASK_RECIPES=(
{task_recipes}
)
export RUN_RECIPE=${{TASK_RECIPES[${{SLURM_ARRAY_TASK_ID:-0}}]}}

# The batch shell runs on the first node of the allocation: it is the rendezvous host, at the address Slurm
# itself reaches it by (its NodeAddr). The port is one that is free there now, so two jobs sharing a node
# never rendezvous on the same port.
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_HOST=$(scontrol show node -o "$first_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MAIN_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
echo "job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, main $MAIN_HOST:$MAIN_PORT: $RUN_RECIPE"

{prepare_step}# One srun task per node. accelerate launch ignores USR1 (by default it would die of it and orphan the
# training processes); the training processes install their own handler and checkpoint on it.
launch_on_node() {{
  trap '' USR1
  touch "$STARTED_DIR/$SLURM_JOB_ID.${{SLURM_RESTART_COUNT:-0}}.$SLURM_NODEID"
  exec "$PYTHON" -m accelerate.commands.launch \
{launch_arguments} \
    {run_script} "$RUN_RECIPE" output.resume_from=auto
}}
export -f launch_on_node

srun --ntasks-per-node=1 --kill-on-bad-exit=1{srun_cpus} bash -c launch_on_node &
step=$!
# A trap interrupts `wait`; keep waiting until the step has ended, then read its exit status.
while kill -0 "$step" 2>/dev/null; do wait "$step"; done
wait "$step"; status=$?
# Stop the repeater and its sleep: a process left behind keeps the job alive while Slurm requeues it.
[ "$stop_requested" = 1 ] && {{ pkill -P "$repeater"; kill "$repeater"; }} 2>/dev/null

# Exit 3 means "stopped at a checkpoint, resume me". accelerate launch turns a child's 3 into 1, so a
# forwarded stop that ended without success counts as one too.
if [ "$status" -eq 3 ] || {{ [ "$stop_requested" = 1 ] && [ "$status" -ne 0 ]; }}; then
  echo "stopped at a checkpoint (exit $status): requeueing job $SLURM_JOB_ID; the next run resumes from it"
  # Slurm ends this script itself as part of the requeue: wait for that rather than report a completion of
  # our own that would race the requeue (the sleep is only a bound, should Slurm not end it).
  scontrol requeue "$SLURM_JOB_ID" && sleep 300
elif [ "$status" -ne 0 ]; then
  script=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'Command=[^ ]*' | cut -d= -f2)
  echo "error: the training step failed (exit $status) on $SLURM_JOB_NODELIST: a rank or a node died, or the" \
       "run stopped with an error (each rank's message is above). Complete checkpoints are kept: once the cause" \
       "is fixed, submit again and the run resumes from the latest one: sbatch" \
       "${{SLURM_ARRAY_TASK_ID:+--array=$SLURM_ARRAY_TASK_ID }}$script" >&2
fi
exit "$status"
"""


PREPARE_STEP = r"""# The data first, before any training process exists (launcher/prepare.py, one task per node): on a cache folder
# all nodes share, the first to take its lock tokenizes and the others read back; on node-local ones, each node.
srun --ntasks-per-node=1 --kill-on-bad-exit=1{srun_cpus} "$PYTHON" {prepare_script} "$RUN_RECIPE" \
  || {{ echo "error: preparing the data failed (the message is above); nothing was trained" >&2; exit 1; }}

"""


def render_script(job: BatchJob) -> str:
    exports = "\n".join(f"export {name}={shlex.quote(value)}" for name, value in device_environment(job).items())
    # Since Slurm 22.05 a step need not inherit sbatch's --cpus-per-task: name it, or each node task may get one CPU.
    srun_cpus = f" --cpus-per-task={job.resources.cpus_per_task}" if job.resources.cpus_per_task else ""
    body = SCRIPT_BODY.format(
        exports=exports,
        python=shlex.quote(job.python),
        task_recipes="\n".join(f"  {shlex.quote(str(path))}" for path in job.run_recipes),
        launch_arguments=" \\\n".join(f"    {argument}" for argument in launch_arguments(job)),
        run_script=shlex.quote(str(job.run_script)),
        srun_cpus=srun_cpus,
        repeat_seconds=STOP_REPEAT_SECONDS,
        started_dir=shlex.quote(str(job.log_dir.parent / "started")),
        prepare_step=PREPARE_STEP.format(prepare_script=shlex.quote(str(job.prepare_script)), srun_cpus=srun_cpus)
        if job.prepare_script else "",
    )
    return "\n".join(["#!/bin/bash", *sbatch_directives(job)]) + "\n" + body


def require_command(name: str) -> None:
    if shutil.which(name) is None:
        raise SlurmError(f"`{name}` is not on PATH: submit from a Slurm login node, or use --dry-run to see the script")


def slurm_query(*command: str) -> str:
    require_command(command[0])
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SlurmError(f"`{' '.join(command)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass(frozen=True)
class NodeInfo:
    name: str
    cpus: int
    gres: dict[str, int]


def parse_gres(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in text.split(","):
        match = GRES_ENTRY.match(entry.strip())
        if match:
            counts[match["name"]] = counts.get(match["name"], 0) + int(match["count"])
    return counts


def resolve_partition(partition: Optional[str]) -> str:
    """The partition the job would run in: the one asked for (which must exist) or the cluster default."""
    names = slurm_query("sinfo", "-h", "-o", "%P").split()
    default = next((name.rstrip("*") for name in names if name.endswith("*")), None)
    known = [name.rstrip("*") for name in names]
    if partition is None:
        if default is None:
            raise SlurmError(f"this cluster has no default partition: pass --partition (one of {', '.join(known)})")
        return default
    if partition not in known:
        raise SlurmError(f"partition {partition!r} does not exist on this cluster; partitions: {', '.join(known)}")
    return partition


def partition_nodes(partition: str) -> list[NodeInfo]:
    nodes = []
    for line in slurm_query("sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%G").splitlines():
        name, cpus, gres = line.split("|")
        nodes.append(NodeInfo(name, int(cpus), parse_gres(gres)))
    return nodes


def check_fits(resources: Resources, nodes: list[NodeInfo], partition: str) -> None:
    """Refuse requests no node of the partition can satisfy, naming what the nodes have."""
    problems = []
    if resources.nodes > len(nodes):
        problems.append(f"--nodes {resources.nodes} but partition {partition!r} has {len(nodes)} node(s)")
    if resources.device != "cpu":
        kind = resources.device  # the generic-resource name: gpu or npu
        most = max((node.gres.get(kind, 0) for node in nodes), default=0)
        if resources.devices_per_node > most:
            problems.append(f"--{kind}s-per-node {resources.devices_per_node} but the nodes of partition "
                            f"{partition!r} have at most {most} {kind.upper()}(s)")
    if resources.cpus_per_task:
        most = max((node.cpus for node in nodes), default=0)
        if resources.cpus_per_task > most:
            problems.append(f"--cpus-per-task {resources.cpus_per_task} but the nodes of partition "
                            f"{partition!r} have at most {most} CPUs")
    if problems:
        raise SlurmError("the cluster cannot run this job:\n" + "\n".join(f"  - {p}" for p in problems))


def check_cluster(resources: Resources) -> str:
    """Check sbatch is there and the partition can hold the job; returns the partition it will run in."""
    require_command("sbatch")
    partition = resolve_partition(resources.partition)
    check_fits(resources, partition_nodes(partition), partition)
    return partition


def sbatch(script: Path) -> str:
    """Submit `script`; returns the job id."""
    output = slurm_query("sbatch", "--parsable", str(script))
    return output.strip().split(";")[0]
