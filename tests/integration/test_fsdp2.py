"""FSDP2 executed: `accelerate launch --config_file accelerate_configs/fsdp2.yaml launcher/run.py` on 2 CPU
processes over gloo (ACCELERATE_USE_CPU=true; launcher/distributed/fsdp.py completes the FSDP set-up Accelerate skips on
CPU). Accelerate's own FSDP2 code runs: `fully_shard` per decoder layer, the full-state-dict gather at export,
`save_state` / `load_state` of the sharded model and optimizer, LoRA inside the wrapped layers.

On the tiny Llama (the fsdp2.yaml auto-wrap needs `_no_split_modules`; BERT is refused by Accelerate 1.15 and 1.16,
see docs/scaling.md). Tolerances as in tests/integration/test_distributed_runs.py; resume is bit-exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from builders import sentiment_rows, write_csv
from launching import TOLERANCE, assert_weights_close, free_port, train_losses
from recipes import tiny_recipe, write_recipe
from runs import REPO, assert_predictions_agree, eval_loss_of, run_cli
from faults import assert_same_weights as assert_bit_identical
from faults import final_weights, train_records
from launcher.distributed.accelerator import LaunchError, fsdp2_plugin_for_cpu
from launcher.train.reporting import read_metrics_log

pytestmark = pytest.mark.slow

FSDP2 = "accelerate_configs/fsdp2.yaml"
CPU = {"ACCELERATE_USE_CPU": "true"}
STEPS = 16  # 128 rows, global batch 8


@pytest.fixture(scope="module")
def llama(assets, tmp_path_factory) -> dict:
    """The tiny Llama saved with a seeded 2-label head and a pad token, so no run initialises anything."""
    folder = tmp_path_factory.mktemp("llama_with_head")
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(assets["llama"], num_labels=2,
                                                               pad_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {**assets, "start": folder, "train_csv": write_csv(folder / "train.csv", sentiment_rows(128, seed=0))}


def write_run(folder, llama: dict, per_device: int, accumulation: int, **sections):
    training = {"epochs": 1, "per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                "log_sample_fingerprints": True, **sections.pop("training", {})}
    recipe = tiny_recipe(llama, folder / "out", model="start", training=training,
                         output={"save_every_epoch": False, "save_every_steps": 8, **sections.pop("output", {})},
                         **sections)
    return write_recipe(folder / "recipe.yaml", recipe)


def launch(*script_and_args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes N SCRIPT ARGS` on CPU."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2, "--num_processes",
               str(processes), "--main_process_port", str(free_port()), *script_and_args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **CPU}, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fsdp2_run(llama, tmp_path_factory):
    """The uninterrupted FSDP2 run (4 per process x 2 processes), through tests/support/shard_report.py."""
    folder = tmp_path_factory.mktemp("fsdp2")
    result = launch("tests/support/shard_report.py", str(write_run(folder, llama, 4, 1)))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out", result.stdout


def test_fsdp2_shards_the_model_and_trains_the_one_process_model(fsdp2_run, llama, tmp_path):
    run_dir, stdout = fsdp2_run
    assert "topology : 2 x cpu (DistributedType.FSDP)" in stdout
    shards = [json.loads((run_dir / "shards" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(shard["dtensor"] for shard in shards), shards
    assert shards[0]["full"] == shards[1]["full"] == shards[0]["local"] + shards[1]["local"], shards
    assert max(shard["local"] for shard in shards) < 0.6 * shards[0]["full"], "each rank holds about half"

    one_process = run_cli(str(write_run(tmp_path, llama, 4, 2)))
    assert one_process.returncode == 0, one_process.stderr[-3000:]
    assert len(train_losses(run_dir)) == STEPS
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "out"), rel=0, abs=TOLERANCE)
    assert_weights_close(run_dir / "model", tmp_path / "out" / "model")


def test_predict_reads_fsdp2_checkpoints(fsdp2_run, llama, tmp_path):
    """The last checkpoint (step 16) holds the exported weights: as per-rank DCP shards (fsdp2.yaml's
    SHARDED_STATE_DICT), which launcher.predict merges, or as one full state dict (FULL_STATE_DICT)."""
    run_dir = fsdp2_run[0]
    checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir()
    assert_predictions_agree(checkpoint, run_dir / "model", llama["eval_csv"], tmp_path)

    full = launch("--fsdp_state_dict_type", "FULL_STATE_DICT", "launcher/run.py", str(write_run(tmp_path, llama, 4, 1)))
    assert full.returncode == 0, full.stderr[-3000:]
    checkpoint = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))[-1]
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()
    assert_predictions_agree(checkpoint, tmp_path / "out" / "model", llama["eval_csv"], tmp_path)


def test_fsdp2_resumes_from_a_sharded_checkpoint_bit_identically(fsdp2_run, llama, tmp_path):
    recipe = write_run(tmp_path, llama, 4, 1)
    killed = launch("tests/support/faults.py", "kill", "12", "all", "--", str(recipe))
    assert killed.returncode != 0
    run_dir = tmp_path / "out"
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("step-*")) == ["step-00000008"]
    assert max(train_records(run_dir)) == 12

    resumed = launch("launcher/run.py", str(recipe), "output.resume_from=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at optimizer step 8" in resumed.stdout
    assert_bit_identical(final_weights(fsdp2_run[0]), final_weights(run_dir))


@pytest.mark.parametrize(("state_dict_type", "processes", "resumed_on"),
                         [("SHARDED_STATE_DICT", 2, 1), ("SHARDED_STATE_DICT", 1, 2), ("FULL_STATE_DICT", 2, 1)])
def test_fsdp2_resumed_on_another_number_of_processes_is_the_same_run(fsdp2_run, llama, tmp_path, state_dict_type,
                                                                      processes, resumed_on):
    """Killed after step 11 (checkpoint at step 8) on `processes`, resumed on `resumed_on` at the same global batch:
    the same examples in every step, losses and final weights within TOLERANCE of the uninterrupted run."""
    recipe = write_run(tmp_path, llama, 4, 2 // processes)
    state_dict = ("--fsdp_state_dict_type", state_dict_type)
    killed = launch(*state_dict, "tests/support/faults.py", "kill", "11", "all", "--", str(recipe), processes=processes)
    run_dir = tmp_path / "out"
    assert killed.returncode != 0 and max(train_records(run_dir)) == 11, killed.stderr[-3000:]

    resumed = launch(*state_dict, "launcher/run.py", str(recipe), "output.resume_from=auto", processes=resumed_on)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    how = ("FSDP shards written by {} process(es) load on {}: torch.distributed.checkpoint reshards them"
           if state_dict_type == "SHARDED_STATE_DICT" else "FSDP full state dict written by {} process(es) loads on {}: "
           "it is sharded anew")
    assert how.format(processes, resumed_on) in resumed.stdout, resumed.stdout[-3000:]
    assert "resumed at optimizer step 8" in resumed.stdout

    expected, got = train_records(fsdp2_run[0]), train_records(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, record in expected.items():
        assert sorted(got[step]["sample_fingerprints"]) == sorted(record["sample_fingerprints"]), step
        assert got[step]["loss"] == pytest.approx(record["loss"], rel=0, abs=TOLERANCE), step
    assert_weights_close(run_dir / "model", fsdp2_run[0] / "model")


def test_a_checkpoint_in_the_other_fsdp_state_dict_type_is_refused_before_anything_loads(fsdp2_run, llama, tmp_path):
    """Accelerate reads the state dict type of the run's plugin: the sharded checkpoint of fsdp2.yaml under
    FULL_STATE_DICT would fail deep inside a collective; it is refused naming both forms."""
    checkpoint = sorted((fsdp2_run[0] / "checkpoints").glob("step-*"))[-1]
    recipe = write_run(tmp_path, llama, 4, 1, output={"resume_from": str(checkpoint)})
    refused = launch("--fsdp_state_dict_type", "FULL_STATE_DICT", "launcher/run.py", str(recipe))
    assert refused.returncode == 1
    assert (f"{checkpoint} holds FSDP shards (pytorch_model_fsdp_0/, SHARDED_STATE_DICT through "
            "torch.distributed.checkpoint), but this run (FSDP) reads an FSDP full state dict") in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_fsdp2_lora_exports_models_that_reproduce_the_training_evaluation(llama, tmp_path):
    recipe = write_run(tmp_path, llama, 4, 1, training={"lr": 1e-2},
                       lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "merge_on_save": True})
    result = launch("launcher/run.py", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DistributedType.FSDP" in result.stdout
    run_dir = tmp_path / "out"
    trained_eval = [r for r in read_metrics_log(run_dir) if r["kind"] == "eval"][-1]["loss"]
    loaders = {"model": AutoModelForSequenceClassification, "adapter": AutoPeftModelForSequenceClassification}
    for folder, loader in loaders.items():
        reloaded = loader.from_pretrained(run_dir / folder, dtype=torch.float32)
        assert eval_loss_of(reloaded, run_dir) == pytest.approx(trained_eval, abs=TOLERANCE), folder


def test_fsdp1_on_cpu_processes_is_refused_rather_than_run_as_ddp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(LaunchError, match="only FSDP2 runs there"):
        fsdp2_plugin_for_cpu()
