"""The sbatch scripts `launcher.submit --dry-run` renders for multi-node GPU and NPU jobs and for sweeps, the errors
raised before anything is submitted, and the sweep table. No cluster needed: real-Slurm runs are in
test_slurm_cluster.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cluster.slurm import SlurmError, parse_gres, time_limit_seconds
from launcher.submit import main as submit_main
from launcher.cluster.sweeps import SweepError, collect, expand, format_table, write_manifest
from launcher.train.run_directory import write_run_summary
from runs import REPO

LLAMA_RECIPE = str(REPO / "recipes" / "llama3_yelp.yaml")


@pytest.fixture
def accelerate_config(tmp_path: Path) -> Path:
    # The topology files in accelerate_configs/ are not this module's subject; the script only names the file.
    path = tmp_path / "multi_node.yaml"
    path.write_text("distributed_type: MULTI_GPU\n")
    return path


def dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = submit_main([*args, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_valid_bash(script: str) -> None:
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def assert_common_multi_node_lines(script: str, out_dir: Path, config: Path) -> None:
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@300",
        f"#SBATCH --output={out_dir}/slurm/logs/%x-%j.out",
        f"#SBATCH --error={out_dir}/slurm/logs/%x-%j.err",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        """export MAIN_HOST=$(scontrol show node -o "$first_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)""",
        f"--config_file {config}",
        '--num_machines "$SLURM_NNODES"',
        '--machine_rank "$SLURM_NODEID"',
        "--num_processes 16",
        '--main_process_ip "$MAIN_HOST"',
        '--main_process_port "$MAIN_PORT"',
        f'{REPO}/launcher/run.py "$RUN_RECIPE" output.resume_from=auto',
        f"  {out_dir}/slurm/recipe.yaml",
        'scancel --signal=USR1 "$SLURM_JOB_ID"',
        'scontrol requeue "$SLURM_JOB_ID"',
    ]:
        assert line in script, f"missing {line!r}"
    assert "--cpu" not in script
    assert_valid_bash(script)


def test_two_node_gpu_script(capsys, tmp_path: Path, accelerate_config: Path):
    out_dir = tmp_path / "llama"
    code, script, err = dry_run(capsys, LLAMA_RECIPE, f"output.dir={out_dir}", "--nodes", "2", "--gpus-per-node", "8",
                                "--partition", "gpu", "--time", "04:00:00",
                                "--accelerate-config", str(accelerate_config), "--env", "NCCL_SOCKET_IFNAME=ib0")
    assert code == 0, err
    assert_common_multi_node_lines(script, out_dir, accelerate_config)
    gpu_lines = ["#SBATCH --gpus-per-node=8", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "export NCCL_SOCKET_IFNAME=ib0"]
    for line in gpu_lines:
        assert line in script, f"missing {line!r}"
    assert "ASCEND" not in script and "HCCL" not in script and "#SBATCH --array" not in script
    assert not out_dir.exists(), "a dry run writes nothing"


def test_two_node_npu_script(capsys, tmp_path: Path, accelerate_config: Path):
    out_dir = tmp_path / "llama"
    code, script, err = dry_run(capsys, LLAMA_RECIPE, f"output.dir={out_dir}", "--nodes", "2", "--npus-per-node", "8",
                                "--partition", "gpu", "--time", "04:00:00",
                                "--accelerate-config", str(accelerate_config))
    assert code == 0, err
    assert_common_multi_node_lines(script, out_dir, accelerate_config)
    npu_lines = ["#SBATCH --gres=npu:8", "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7",
                 "export HCCL_CONNECT_TIMEOUT=", "export HCCL_EXEC_TIMEOUT=1800"]  # the recipe's collective timeout
    for line in npu_lines:
        assert line in script, f"missing {line!r}"
    assert "--gpus-per-node" not in script and "NCCL" not in script


def test_sweep_becomes_a_job_array_with_one_output_dir_per_task(capsys, tmp_path: Path, accelerate_config: Path):
    out_dir = tmp_path / "sweep"
    code, script, err = dry_run(capsys, LLAMA_RECIPE, f"output.dir={out_dir}", "--gpus-per-node", "1",
                                "--accelerate-config", str(accelerate_config), "--max-running", "2",
                                "--array", "training.lr=1e-5,2e-5", "--array", "lora.r=8,16")
    assert code == 0, err
    assert "#SBATCH --array=0-3%2" in script
    assert f"#SBATCH --output={out_dir}/slurm/logs/%x-%A_%a.out" in script
    task_dirs = ["0-training.lr=1e-5_lora.r=8", "1-training.lr=1e-5_lora.r=16",
                 "2-training.lr=2e-5_lora.r=8", "3-training.lr=2e-5_lora.r=16"]
    listed = "TASK_RECIPES=(\n" + "".join(f"  {out_dir}/{name}/slurm/recipe.yaml\n" for name in task_dirs) + ")"
    assert listed in script
    assert_valid_bash(script)


def test_every_sweep_task_is_validated_and_all_problems_are_reported(capsys, tmp_path: Path, accelerate_config: Path):
    code, script, err = dry_run(capsys, LLAMA_RECIPE, f"output.dir={tmp_path}", "--gpus-per-node", "1",
                                "--accelerate-config", str(accelerate_config), "--array", "training.lr=2,3,1e-5")
    assert code == 1 and script == ""
    assert "array task 0 (training.lr=2)" in err and "array task 1 (training.lr=3)" in err
    assert "array task 2" not in err


def test_invalid_recipe_is_refused_before_rendering(capsys, tmp_path: Path):
    code, script, err = dry_run(capsys, LLAMA_RECIPE, f"output.dir={tmp_path}", "training.lr=oops", "trainig.epochs=2")
    assert code == 1 and script == ""
    assert "training.lr" in err and "did you mean 'training'" in err


def test_missing_accelerate_config_is_named(capsys, tmp_path: Path):
    code, _, err = dry_run(capsys, LLAMA_RECIPE, f"output.dir={tmp_path}", "--gpus-per-node", "8",
                           "--accelerate-config", str(tmp_path / "absent.yaml"))
    assert code == 1 and "absent.yaml not found" in err


def test_missing_sbatch_is_a_clear_error(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without Slurm's clients, as on a laptop
    code = submit_main([LLAMA_RECIPE, f"output.dir={tmp_path / 'run'}", "--cpus-per-task", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "`sbatch` is not on PATH" in err
    assert not (tmp_path / "run").exists()


def test_one_cpu_process_jobs_refuse_several_nodes(capsys, tmp_path: Path):
    with pytest.raises(SystemExit):
        submit_main([LLAMA_RECIPE, f"output.dir={tmp_path}", "--nodes", "2", "--dry-run"])
    assert "or --cpu-processes-per-node for DDP over gloo" in capsys.readouterr().err


def test_cpu_process_jobs_launch_through_torchrun_with_a_cpu_group(capsys, tmp_path: Path, monkeypatch):
    """Run for real on the 2-node test cluster in test_slurm_multi_node.py; here the lines that make it so."""
    monkeypatch.chdir(REPO)
    code, script, err = dry_run(capsys, LLAMA_RECIPE, f"output.dir={tmp_path}", "--nodes", "2",
                                "--cpu-processes-per-node", "2", "--cpus-per-task", "8")
    assert code == 0, err
    for line in ["export ACCELERATE_USE_CPU=true", "export OMP_NUM_THREADS=4", "--num_processes 4",
                 f"--config_file {REPO}/accelerate_configs/multi_node.yaml"]:
        assert line in script, f"missing {line!r}"
    assert "--cpu " not in script and "NCCL" not in script and "#SBATCH --gpus" not in script


def test_prepare_runs_the_data_preparation_as_a_first_step_on_every_node(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = (LLAMA_RECIPE, f"output.dir={tmp_path}", "--nodes", "2", "--cpu-processes-per-node", "1")
    code, prepared, err = dry_run(capsys, *args, "--prepare")
    assert code == 0, err
    code, plain, err = dry_run(capsys, *args)
    assert code == 0, err
    step = f'srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" {REPO}/launcher/prepare.py "$RUN_RECIPE"'
    assert step in prepared and "prepare.py" not in plain
    assert prepared.index(step) < prepared.index("bash -c launch_on_node")
    assert_valid_bash(prepared)


def test_sweep_specs_expand_to_their_product():
    tasks = expand(["a.x=1,2", "b.y=p,q,r"])
    assert [t.overrides for t in tasks][:2] == [["a.x=1", "b.y=p"], ["a.x=1", "b.y=q"]]
    assert len(tasks) == 6 and [t.index for t in tasks] == list(range(6))
    with pytest.raises(SweepError, match="names a key twice"):
        expand(["a.x=1", "a.x=2"])
    with pytest.raises(SweepError, match="not of the form"):
        expand(["a.x=1,,2"])


def test_a_warning_signal_not_shorter_than_the_time_limit_is_refused(capsys, tmp_path: Path):
    with pytest.raises(SystemExit):
        submit_main([LLAMA_RECIPE, f"output.dir={tmp_path}", "--time", "4:00", "--dry-run"])
    assert "--signal-time 300 s is not shorter than --time 4:00" in capsys.readouterr().err


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("30:15", 1815), ("04:00:00", 14400), ("2-0", 172800),
                                           ("1-12:30", 131400), ("1-00:00:05", 86405), ("UNLIMITED", None)])
def test_slurm_time_limits_are_read_in_every_format(text: str, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["1:2:3:4", "4h", ""])
def test_malformed_time_limits_are_refused(text: str):
    with pytest.raises(SlurmError, match="is not a Slurm time limit"):
        time_limit_seconds(text)


def test_gres_counts_are_read_from_sinfo_entries():
    assert parse_gres("gpu:a100:4(S:0-1),gpu:v100:2,npu:8") == {"gpu": 6, "npu": 8}
    assert parse_gres("(null)") == {}


def test_the_documented_script_is_what_submit_renders(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, script, err = dry_run(capsys, "recipes/llama3_yelp.yaml", "--nodes", "2", "--gpus-per-node", "8",
                                "--partition", "gpu", "--time", "04:00:00")
    assert code == 0, err
    # The docs show a checkout in /home/alice/launcher with its virtual environment in .venv.
    script = script.replace(sys.executable, "/home/alice/launcher/.venv/bin/python")
    script = script.replace(str(REPO), "/home/alice/launcher")
    docs = (REPO / "docs" / "clusters.md").read_text()
    documented = docs[docs.index("#!/bin/bash"):]
    documented = documented[: documented.index("```")]
    assert documented == script, "docs/clusters.md shows an outdated script: paste the new --dry-run output there"


def test_collect_reports_unfinished_tasks_and_throughput_after_warm_up(tmp_path: Path):
    tasks = expand(["training.lr=1e-3,5e-4"])
    run_dirs = [tmp_path / task.slug for task in tasks]
    (tmp_path / "slurm").mkdir()
    write_manifest(tmp_path, tasks, run_dirs)
    run_dirs[0].mkdir()
    write_run_summary(run_dirs[0], {"optimizer_steps": 3, "final_eval": {"loss": 0.5, "accuracy": 0.75, "examples": 4}})
    steps = [{"kind": "train", "step": 1, "samples": 8, "step_seconds": 4.0},  # warm-up: left out
             {"kind": "train", "step": 2, "samples": 8, "step_seconds": 0.5},
             {"kind": "train", "step": 3, "samples": 8, "step_seconds": 0.5}]
    (run_dirs[0] / "metrics.jsonl").write_text("".join(json.dumps(step) + "\n" for step in steps))

    done, pending = collect(tmp_path)
    assert done == {"task": 0, "training.lr": "1e-3", "state": "done", "steps": 3, "eval_loss": 0.5,
                    "eval_accuracy": 0.75, "samples/s": 16.0, "dir": str(run_dirs[0])}
    assert (pending["state"], pending["steps"], pending["samples/s"]) == ("not started", None, None)
    header, first, second = format_table([done, pending]).splitlines()
    assert header.split() == ["task", "training.lr", "state", "steps", "eval_loss", "eval_accuracy", "samples/s", "dir"]
    assert second.split()[:4] == ["1", "5e-4", "not", "started"]
