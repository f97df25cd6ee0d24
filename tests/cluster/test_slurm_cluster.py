"""`launcher.submit` against a real single-node Slurm cluster (brought up by the `slurm_cluster` fixture):
a CPU job runs to the end, a 2-task sweep is collected into one table, and a preempted job checkpoints, requeues
itself and finishes with the same weights as an uninterrupted run."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from builders import sentiment_rows, write_csv
from recipes import tiny_recipe, write_recipe
from slurm_cluster import SUBMITTED, log_text, release_requeued_job, wait_for_training
from faults import assert_same_weights, final_weights
from launcher.recipe.loading import load_recipe
from launcher.submit import main as submit_main
from launcher.sweep import main as sweep_main
from launcher.train.reporting import read_metrics_log
from launcher.train.run_directory import read_run_summary
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm
def submit(capsys, recipe: Path, *args: str) -> str:
    """`python -m launcher.submit RECIPE ARGS` (in this process); returns the job id it printed."""
    code = submit_main([str(recipe), "--cpus-per-task", "1", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return SUBMITTED.search(out).group(1)


@pytest.mark.slow
def test_cpu_job_trains_to_the_end(slurm_cluster: SlurmCluster, assets, tmp_path: Path, capsys):
    """With --prepare: the job's first step tokenizes, the training step reads the preparation back."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, out, data={"cache_dir": str(tmp_path / "cache")}))
    job_id = submit(capsys, recipe, "training.epochs=1", "--time", "00:10:00", "--prepare")
    (job,) = slurm_cluster.wait_ended(job_id)

    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log_text(out, ".err")[-3000:]
    assert read_run_summary(out)["optimizer_steps"] == 8  # 64 rows / batch 8, one epoch (the override)
    kinds = [record["kind"] for record in read_metrics_log(out)]
    assert kinds.count("train") == 8 and kinds.count("eval") == 1
    assert (out / "model" / "model.safetensors").is_file()
    frozen = out / "slurm" / "recipe.yaml"
    assert load_recipe(frozen).training.epochs == 1
    assert "#SBATCH --time=00:10:00" in (out / "slurm" / "job.sbatch").read_text()
    log = (out / "slurm" / "logs" / f"tiny-{job_id}.out").read_text()
    assert f"job {job_id}, restart 0" in log and f": {frozen}" in log
    assert "done: 8 steps" in log
    assert log.index("data: prepared in") < log.index("data: reused (cache hit)")  # the step, then the run's plan


@pytest.mark.slow
def test_sweep_runs_as_a_job_array_and_collects_into_one_table(slurm_cluster: SlurmCluster, assets, tmp_path: Path,
                                                               capsys):
    root = tmp_path / "sweep"
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, root))
    job_id = submit(capsys, recipe, "training.epochs=1", "--array", "training.lr=1e-3,5e-4")
    tasks = slurm_cluster.wait_ended(job_id)

    assert sorted(task["JobState"] for task in tasks) == ["COMPLETED", "COMPLETED"], log_text(root, ".err")[-3000:]
    for index in (0, 1):
        assert (root / "slurm" / "logs" / f"tiny-{job_id}_{index}.out").is_file()
    assert sweep_main([str(root)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["task", "training.lr", "state", "steps", "eval_loss"]
    assert "eval_accuracy" in header and "samples/s" in header
    assert [row.split()[:4] for row in rows] == [["0", "1e-3", "done", "8"], ["1", "5e-4", "done", "8"]]
    finals = [read_run_summary(root / name)["final_eval"] for name in ("0-training.lr=1e-3", "1-training.lr=5e-4")]
    assert finals[0] != finals[1], "each task trained with its own learning rate"


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(slurm_cluster: SlurmCluster, assets,
                                                                                tmp_path: Path, capsys):
    # 160 steps of a dropout-free tiny BERT: long enough that the warning lands mid-training.
    train_csv = write_csv(tmp_path / "train.csv", sentiment_rows(1280, seed=0))
    sections = {"data": {"train_file": str(train_csv)}, "training": {"epochs": 1, "log_every_steps": 1},
                "output": {"save_every_epoch": False}}
    runs = {}
    for name in ("preempted", "reference"):
        recipe = tiny_recipe(assets, tmp_path / name, "bert_no_dropout", **sections)
        runs[name] = submit(capsys, write_recipe(tmp_path / f"{name}.yaml", recipe))
    preempted = tmp_path / "preempted"
    wait_for_training(preempted)

    subprocess.run(["scancel", "--batch", "--signal=USR1", runs["preempted"]], check=True)
    def requeued(jobs: list[dict[str, str]]) -> bool:
        return jobs[0]["Restarts"] == "1" and jobs[0]["JobState"] == "PENDING"

    slurm_cluster.wait_until(runs["preempted"], requeued, 90, "requeued")
    release_requeued_job(runs["preempted"], requeued_by=time.time())
    for name, job_id in runs.items():
        (job,) = slurm_cluster.wait_ended(job_id, timeout=180)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (
            f"{job}\n{log_text(tmp_path / name)[-3000:]}\n{log_text(tmp_path / name, '.err')[-3000:]}\n"
            f"{slurm_cluster.daemon_logs()}")

    log = log_text(preempted)
    stopped_at = int(re.search(r"stopped by SIGUSR1 at optimizer step (\d+); checkpoint written", log).group(1))
    assert 0 < stopped_at < 160
    assert (preempted / "checkpoints" / f"step-{stopped_at:08d}" / "manifest.json").is_file()
    assert "preemption warning" in log and f"requeueing job {runs['preempted']}" in log
    assert f"job {runs['preempted']}, restart 1" in log and f"resumed at optimizer step {stopped_at}" in log
    assert [read_run_summary(tmp_path / name)["optimizer_steps"] for name in runs] == [160, 160]
    assert_same_weights(final_weights(tmp_path / "reference"), final_weights(preempted))


def test_requests_the_cluster_cannot_hold_are_refused_before_submitting(slurm_cluster: SlurmCluster, assets,
                                                                        tmp_path: Path, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, tmp_path / "run"))
    config = tmp_path / "multi_node.yaml"
    config.write_text("distributed_type: MULTI_GPU\n")
    cases = {
        ("--partition", "nosuch"): "partition 'nosuch' does not exist on this cluster; partitions: debug",
        ("--gpus-per-node", "1", "--accelerate-config", str(config)): "at most 0 GPU(s)",
        ("--nodes", "3", "--gpus-per-node", "1", "--accelerate-config", str(config)): "partition 'debug' has 2 node(s)",
        ("--cpus-per-task", "512"): "have at most",
    }
    for args, message in cases.items():
        assert submit_main([str(recipe), *args]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_warning_during_start_up_is_repeated_until_the_training_stops(slurm_cluster: SlurmCluster, assets,
                                                                         tmp_path: Path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, out, training={"epochs": 200}))
    job_id = submit(capsys, recipe)
    log = out / "slurm" / "logs" / f"tiny-{job_id}.out"
    deadline = time.monotonic() + 60
    while not (log.is_file() and f"job {job_id}, restart 0" in log.read_text()):  # the trap is set by then
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    assert not (out / "metrics.jsonl").exists(), "the warning must land while the run is still starting"

    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    slurm_cluster.wait_until(job_id, lambda jobs: jobs[0]["Restarts"] == "1", 120, "requeued")
    subprocess.run(["scancel", job_id], check=True)
    assert re.search(r"stopped by SIGUSR1 at optimizer step \d+; checkpoint written", log.read_text())
