"""A real two-node Slurm cluster on this one machine for the tests (slurmctld, munge, and one slurmd per node,
`slurmd -N node1` at 127.0.0.2 and `slurmd -N node2` at 127.0.0.3, from Debian's packages).

`scripts/slurm/start-slurm.sh` installs and starts it once per session, in its own folder and on free ports;
`scripts/slurm/stop-slurm.sh` stops it by the daemons' pid files. Test files use it with
`from slurm_cluster import slurm_cluster` (the fixture) and the helpers below.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "slurm"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
JOB_FIELD = re.compile(r"(\w+)=(\S*)")
NODES = ("node1", "node2")


def why_no_cluster() -> Optional[str]:
    """The reason this machine cannot bring a cluster up, or None."""
    if os.geteuid() != 0:
        return "needs root to install and start slurmctld/slurmd (CI runs as root)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    while True:
        first = free_port()
        probes = [socket.socket() for _ in range(count - 1)]
        try:
            for offset, probe in enumerate(probes, start=1):
                probe.bind(("127.0.0.1", first + offset))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()


@dataclass
class SlurmCluster:
    base: Path

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o ID` as one dict per job (one per task for an array)."""
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
        return [dict(JOB_FIELD.findall(line)) for line in shown.stdout.splitlines() if line.strip()]

    def wait_until(self, job_id: str, condition: Callable[[list[dict[str, str]]], bool], timeout: float,
                   what: str) -> list[dict[str, str]]:
        """Poll `scontrol` (sbatch --wait polls with growing sleeps, far too slowly) until `condition` holds."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_id)
            if condition(jobs):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not {what} after {timeout} s: "
                                     f"{[(j['JobId'], j['JobState'], j.get('Reason')) for j in jobs]}")
            time.sleep(0.3)

    def wait_ended(self, job_id: str, timeout: float = 120) -> list[dict[str, str]]:
        return self.wait_until(job_id, lambda jobs: all(j["JobState"] in ENDED for j in jobs), timeout, "ended")

    def daemon_logs(self, lines: int = 80) -> str:
        """The last `lines` of the controller's and the node daemons' logs: what a failed assertion on a job's
        end state shows, since the cluster's folder is removed at teardown."""
        shown = []
        for daemon in ("slurmctld", *(f"slurmd-{node}" for node in NODES)):
            path = self.base / "log" / f"{daemon}.log"
            text = path.read_text(errors="replace").splitlines() if path.is_file() else ["(no log)"]
            shown += [f"--- {path}:", *text[-lines:]]
        return "\n".join(shown)


def start_cluster(base: Path) -> subprocess.CompletedProcess:
    # The node daemons listen on SLURMD_PORT and the ports after it: pick a run of free ones.
    slurmd_port = free_port_run(len(NODES))
    env = {**os.environ, "SLURM_TEST_BASE": str(base), "SLURM_NODES": str(len(NODES)),
           "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(slurmd_port)}
    return subprocess.run(["bash", str(SCRIPTS / "start-slurm.sh")], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running cluster with SLURM_CONF exported for the clients (sbatch, scontrol...) this session runs."""
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp_path: slurmctld runs as user `slurm` and cannot enter root's 0700 folders.
    base = Path(tempfile.mkdtemp(prefix="launcher-slurm-"))
    base.chmod(0o755)
    started = start_cluster(base)
    try:  # stop whatever did start, even when the start failed half-way
        if started.returncode != 0:
            pytest.fail(f"start-slurm.sh failed:\n{started.stdout}\n{started.stderr}")
        os.environ["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
        yield SlurmCluster(base)
    finally:
        stop_env = {**os.environ, "SLURM_TEST_BASE": str(base)}
        stopped = subprocess.run(["bash", str(SCRIPTS / "stop-slurm.sh")], env=stop_env, capture_output=True, text=True,
                                 timeout=300)
        os.environ.pop("SLURM_CONF", None)
        if stopped.returncode == 0:
            shutil.rmtree(base, ignore_errors=True)


SUBMITTED = re.compile(r"^submitted (?:batch job|job array of \d+ tasks) (\d+) ", re.MULTILINE)


def log_text(run_dir: Path, suffix: str = ".out") -> str:
    """The job's (or every array task's) stdout log, or with `suffix=".err"` its stderr."""
    return "".join(path.read_text() for path in sorted((run_dir / "slurm" / "logs").glob(f"*{suffix}")))


def wait_for_training(run_dir: Path, timeout: float = 120) -> None:
    """Until the run has logged an optimizer step, so its stop handler is installed."""
    deadline = time.monotonic() + timeout
    log = run_dir / "metrics.jsonl"
    while not (log.is_file() and '"kind": "train"' in log.read_text()):
        assert time.monotonic() < deadline, f"{run_dir} logged no training step in {timeout} s"
        time.sleep(0.2)


def wait_for_node_cleanup(deadline: float) -> None:
    """Until no node of the cluster carries the COMPLETING flag."""
    while True:
        nodes = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, check=True).stdout
        states = re.findall(r"State=(\S+)", nodes)
        if not any("COMPLETING" in state for state in states):
            return
        assert time.monotonic() < deadline, f"nodes still completing: {states}"
        time.sleep(0.3)


def release_requeued_job(job_id: str, requeued_by: float) -> None:
    """Start a requeued job now instead of after the ~120 s hold Slurm gives it (its BeginTime).

    The hold is what normally keeps a relaunch out of the second in which the first run was killed: slurmd
    revokes a killed job's credential at that second, and refuses any credential of the job created at or
    before it (`cred->ctime <= revoked`, whole seconds), logging "Job N already killed, do not launch batch
    job" while the job ends FAILED 1:0. So wait for the node's clean-up and then for the clock to move on by
    more than a second past `requeued_by` (a time after the kill) before releasing the job."""
    wait_for_node_cleanup(time.monotonic() + 60)
    time.sleep(max(0.0, math.floor(requeued_by) + 2 - time.time()))
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
