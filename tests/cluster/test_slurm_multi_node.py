"""One training job across the two nodes of the real Slurm cluster the `slurm_cluster` fixture starts on this
machine (node1 at 127.0.0.2, node2 at 127.0.0.3, each its own slurmd): `launcher.submit --nodes 2
--cpu-processes-per-node 1` runs one `srun` task per node, each an `accelerate launch` of its node's rank with
the rendezvous the script derives from Slurm, DDP over gloo on loopback.

- the 2-node job trains the model one process trains at the same global batch (within 1e-5, as on one node);
- a preemption warning reaches the ranks on both nodes, one checkpoint is written, the job requeues, resumes
  on both nodes and ends bit-identical to an uninterrupted 2-node job;
- a node's processes are SIGKILLed mid-run: the job ends within the collective timeout with an error that says
  what to do, and a resubmission with output.resume_from=auto ends bit-identical to the uninterrupted job;
- a 2-node job preempted at an exact step and resubmitted with `--nodes 1` resumes on one process at the same
  global batch and ends as the uninterrupted 2-node job (same examples per step, losses and weights within 1e-5).

Each run goes through tests/support/rank_harness.py (launcher/run.py plus a record per rank of its node, pid and the
stop signals it received).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import launcher.cluster.submission
import launcher.submit
from builders import sentiment_rows, write_csv
from launching import assert_weights_close
from recipes import tiny_recipe, write_recipe
from runs import REPO, run_cli
from slurm_cluster import SUBMITTED, log_text, release_requeued_job, wait_for_training
from faults import assert_same_weights, final_weights, train_records
from launcher.train.run_directory import read_run_summary
from rank_harness import read_ranks
from slurm_cluster import NODES, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HARNESS = REPO / "tests" / "support" / "rank_harness.py"
TOLERANCE = 1e-5
# 2560 rows, global batch 8: about 3 s of training on an idle 2-core machine (measured 15 ms a step under load),
# against about 0.5 s from the test's warning to the ranks' handlers, so the signal lands mid-training.
STEPS = 320
TWO_NODES = ("--nodes", "2", "--cpu-processes-per-node", "1", "--env", "GLOO_SOCKET_IFNAME=lo")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("multi_node") / "train.csv", sentiment_rows(STEPS * 8, seed=0))


def run_recipe(assets, data: Path, folder: Path, per_device: int, accumulation: int, **output) -> Path:
    folder.mkdir(exist_ok=True)
    recipe = tiny_recipe(assets, folder / "out", "bert_no_dropout", data={"train_file": str(data)},
                         training={"epochs": 1, "per_device_batch_size": per_device,
                                   "gradient_accumulation_steps": accumulation, "collective_timeout_s": 20},
                         output={"save_every_epoch": False, **output})
    return write_recipe(folder / "recipe.yaml", recipe)


def submit_two_nodes(recipe: Path, *args: str) -> str:
    """`python -m launcher.submit RECIPE --nodes 2 --cpu-processes-per-node 1 ...` in this process, each rank run
    through the harness; returns the job id it printed."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        monkeypatch.setattr(launcher.cluster.submission, "RUN_SCRIPT", HARNESS)
        code = launcher.submit.main([str(recipe), "--cpus-per-task", "1", *TWO_NODES, *args])
    assert code == 0, err.getvalue()
    return SUBMITTED.search(out.getvalue()).group(1)


def assert_completed(cluster: SlurmCluster, job_id: str, run_dir: Path, timeout: float = 240) -> dict:
    (job,) = cluster.wait_ended(job_id, timeout=timeout)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"{job}\n{log_text(run_dir)[-3000:]}\n{log_text(run_dir, '.err')[-3000:]}\n{cluster.daemon_logs()}")
    return job


def assert_one_rank_per_node(run_dir: Path, restart: int = 0) -> None:
    ranks = read_ranks(run_dir, restart)
    assert [(r["rank"], r["node"]) for r in ranks] == [(0, NODES[0]), (1, NODES[1])], ranks


def run_two_nodes(cluster: SlurmCluster, recipe: Path) -> Path:
    """Submit `recipe` to both nodes, wait until it completed on node1 and node2; returns its run dir."""
    run_dir = recipe.parent / "out"
    job = assert_completed(cluster, submit_two_nodes(recipe), run_dir)
    assert job["NodeList"] == "node[1-2]" and job["NumNodes"] == "2"
    return run_dir


@pytest.fixture(scope="module")
def two_node_reference(slurm_cluster: SlurmCluster, assets, data, tmp_path_factory) -> Path:
    """The uninterrupted 2-node job the interrupted ones must equal bit for bit: 4 per process x 2 processes."""
    folder = tmp_path_factory.mktemp("two_node_reference")
    return run_two_nodes(slurm_cluster, run_recipe(assets, data, folder, per_device=4, accumulation=1))


def test_two_node_job_trains_the_one_process_model(slurm_cluster: SlurmCluster, assets, tmp_path):
    # The 8 steps of the 1-process comparisons in test_distributed_runs.py (measured drift about 1e-7); over
    # hundreds of steps Adam turns float32 noise in gradients that are zero in exact arithmetic (attention key
    # biases) into lr-sized steps, and the weights drift apart beyond 1e-5.
    data = assets["train_csv"]
    two_node_dir = run_two_nodes(slurm_cluster, run_recipe(assets, data, tmp_path / "two", 4, accumulation=1))
    result = run_cli(str(run_recipe(assets, data, tmp_path / "one", per_device=4, accumulation=2)))
    assert result.returncode == 0, result.stderr[-3000:]

    assert_one_rank_per_node(two_node_dir)
    log = log_text(two_node_dir)
    assert re.search(r"main 127\.0\.0\.2:\d+:", log), "rendezvous at node1's address"
    assert "global batch : 8 = " in log and "x 2 process(es)" in log
    two_nodes, one = train_records(two_node_dir), train_records(tmp_path / "one" / "out")
    assert len(two_nodes) == 8
    assert [two_nodes[s]["loss"] for s in sorted(two_nodes)] == pytest.approx(
        [one[s]["loss"] for s in sorted(one)], rel=0, abs=TOLERANCE)
    expected, got = final_weights(tmp_path / "one" / "out"), final_weights(two_node_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (got[name] - expected[name]).abs().max() <= TOLERANCE, name


def test_preemption_across_nodes_checkpoints_once_requeues_and_ends_like_an_uninterrupted_job(
        slurm_cluster: SlurmCluster, two_node_reference: Path, assets, data, tmp_path):
    run_dir = tmp_path / "out"
    job_id = submit_two_nodes(run_recipe(assets, data, tmp_path, per_device=4, accumulation=1))
    wait_for_training(run_dir)

    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    slurm_cluster.wait_until(job_id, lambda jobs: jobs[0]["Restarts"] == "1" and jobs[0]["JobState"] == "PENDING",
                             120, "requeued")
    release_requeued_job(job_id, requeued_by=time.time())
    job = assert_completed(slurm_cluster, job_id, run_dir)
    assert job["NodeList"] == "node[1-2]"

    stopped = read_ranks(run_dir, restart=0)
    assert [(r["node"], "SIGUSR1" in r["signals"]) for r in stopped] == [(NODES[0], True), (NODES[1], True)], stopped
    assert_one_rank_per_node(run_dir, restart=1)
    log = log_text(run_dir)
    stopped_at = int(re.search(r"stopped by SIGUSR1 at optimizer step (\d+); checkpoint written", log).group(1))
    assert 0 < stopped_at < STEPS
    assert f"job {job_id}, restart 1" in log and f"resumed at optimizer step {stopped_at}" in log
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").glob("step-*"))
    assert checkpoints == [f"step-{stopped_at:08d}"], "exactly one checkpoint: the one the warning asked for"
    assert read_run_summary(run_dir)["optimizer_steps"] == STEPS
    assert_same_weights(final_weights(two_node_reference), final_weights(run_dir))


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while step not in (train_records(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}):
        assert time.monotonic() < deadline, f"{run_dir} did not reach step {step} in {timeout} s"
        time.sleep(0.05)


def test_a_node_that_dies_ends_the_job_with_an_actionable_error_and_a_resubmission_loses_nothing(
        slurm_cluster: SlurmCluster, two_node_reference: Path, assets, data, tmp_path):
    run_dir = tmp_path / "out"
    recipe = run_recipe(assets, data, tmp_path, per_device=4, accumulation=1, save_every_steps=10)
    job_id = submit_two_nodes(recipe)
    wait_for_step(run_dir, 25)

    # node2 dies: its training process and the accelerate launch that started it, at once, by SIGKILL.
    (node2_rank,) = [rank for rank in read_ranks(run_dir, 0) if rank["node"] == NODES[1]]
    for pid in (node2_rank["pid"], node2_rank["parent"]):
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    (job,) = slurm_cluster.wait_ended(job_id, timeout=120)
    waited = time.monotonic() - killed_at

    assert job["JobState"] == "FAILED", job
    assert waited < 20 + 15, f"the job ended {waited:.0f} s after node2 died (collective timeout 20 s)"
    errors = log_text(run_dir, ".err")
    assert re.search(r"error: the training step failed \(exit \d+\) on node\[1-2\]", errors), errors[-3000:]
    assert f"submit again and the run resumes from the latest one: sbatch {run_dir}/slurm/job.sbatch" in errors
    last_checkpoint = max(int(path.name.split("-")[1]) for path in (run_dir / "checkpoints").glob("step-*"))
    assert last_checkpoint >= 20

    resubmitted = submit_two_nodes(recipe, "output.resume_from=auto")
    assert_completed(slurm_cluster, resubmitted, run_dir)
    assert f"resumed at optimizer step {last_checkpoint}" in log_text(run_dir)
    assert read_run_summary(run_dir)["optimizer_steps"] == STEPS
    assert_same_weights(final_weights(two_node_reference), final_weights(run_dir))


def test_a_two_node_job_resubmitted_on_one_node_resumes_as_the_same_run(slurm_cluster: SlurmCluster, assets, tmp_path):
    """16 steps (64 rows, 4 per process x 2 processes, 2 epochs); stopped at step 5 and checkpointed there, then
    one process on one node takes over with accumulation 2 (as a smaller allocation would)."""
    def recipe_in(folder: Path) -> Path:
        folder.mkdir()
        return write_recipe(folder / "recipe.yaml", tiny_recipe(
            assets, folder / "out", "bert_no_dropout",
            training={"epochs": 2, "per_device_batch_size": 4, "log_sample_fingerprints": True, "collective_timeout_s": 20},
            output={"save_every_epoch": False}))

    reference = run_two_nodes(slurm_cluster, recipe_in(tmp_path / "reference"))
    recipe = recipe_in(tmp_path / "elastic")
    run_dir = recipe.parent / "out"
    # Each rank's own stop handler runs at step 5 (not the batch shell's warning, so the job does not requeue
    # itself): a checkpoint at step 5 and a job that has ended, as after a preemption that took its nodes.
    job_id = submit_two_nodes(recipe, "--env", "HARNESS_SIGUSR1_AFTER_STEP=5")
    slurm_cluster.wait_ended(job_id, timeout=180)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000005"]
    assert log_text(run_dir).count("stopped by SIGUSR1 at optimizer step 5; checkpoint written") == 2  # both nodes

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        monkeypatch.setattr(launcher.cluster.submission, "RUN_SCRIPT", HARNESS)
        code = launcher.submit.main([str(recipe), "--cpus-per-task", "1", "--nodes", "1", "output.resume_from=auto"])
    assert code == 0, err.getvalue()
    resumed_id = SUBMITTED.search(out.getvalue()).group(1)
    job = assert_completed(slurm_cluster, resumed_id, run_dir)
    assert job["NumNodes"] == "1"
    log = log_text(run_dir)
    assert ("resume on 1 process(es), checkpoint written by 2: gradient accumulation 1 -> 2 (per device 4) keeps "
            "the global batch 8") in log, log[-3000:]
    expected, resumed = train_records(reference), train_records(run_dir)
    assert sorted(resumed) == sorted(expected) == list(range(1, 17))
    for step in expected:
        assert sorted(resumed[step]["sample_fingerprints"]) == sorted(expected[step]["sample_fingerprints"]), step
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=0, abs=TOLERANCE), step
    assert_weights_close(run_dir / "model", reference / "model")
