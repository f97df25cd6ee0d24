"""The accelerator kit (benchmarks/device/) cannot rot between lent GPUs: its command runs here in CPU smoke mode
(toy sizes, the same stages, code and result files), and the loop variant it measures trains exactly like the
launcher's loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from recipes import tiny_recipe, write_recipe
from runs import REPO, run_in_process
from launcher.train.reporting import read_metrics_log

sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not part of the installed package

from benchmarks.device.deferred_sync import DeferredSyncLoop  # noqa: E402
from benchmarks.measure import lora_adjusted_flops_per_s  # noqa: E402

# What the device tool returns: at most 8 files.
RETURNED = {"device-kit.json", "device-kit.md", "kit.log", "pytest-cuda.xml", "all-results.tar.gz",
            "bert-base-seq128.png", "llama3-8b-lora-seq512.png", "llama3-8b-lora-sft-seq512.png"}


@pytest.mark.slow
def test_the_kit_command_runs_in_smoke_mode_and_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "KIT_WORK": str(tmp_path / "work")}
    env.pop("LAUNCHER_KIT_SMOKE", None)
    result = subprocess.run(["bash", "benchmarks/device/run.sh", "--smoke", str(tmp_path / "out")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} == RETURNED
    report = json.loads((tmp_path / "out" / "device-kit.json").read_text())

    tests = report["tests"]
    assert tests["counts"]["failure"] == tests["counts"]["error"] == 0
    assert tests["counts"]["passed"] >= 4, "the CPU-capable CUDA tests run in smoke mode"
    assert report["environment"]["libraries"]["torch"] != "missing"

    bert, llama = report["benchmarks"]["bert-base-seq128"], report["benchmarks"]["llama3-8b-lora-seq512"]
    sft = report["benchmarks"]["llama3-8b-lora-sft-seq512"]
    assert [v["name"] for v in bert["variants"]] == ["tutorial_max_length", "tutorial_dynamic", "launcher_default",
                                                     "launcher_deferred_sync"]
    assert all("summary" in v for v in bert["variants"] + llama["variants"] + sft["variants"]), "every variant measured"
    assert sft["recipe"]["task"]["type"] == "causal_lm" and "lora_flops" in sft["variants"][0]["kit"]
    default = {v["name"]: v for v in bert["variants"]}["launcher_default"]
    assert default["kit"]["memory_plan"]["total_bytes"] > 0
    lora = llama["variants"][0]["kit"]["lora_flops"]
    assert lora["adapters"] > 0 and lora["frozen_non_embedding"] > 0 and lora["model_flops_per_s_adjusted"] > 0
    assert set(report["host_sync"]["samples_per_s_gain_over_per_step_sync"]) == {"launcher_deferred_sync"}
    assert len(report["targets"]) == 5 and "## Targets" in (tmp_path / "out" / "device-kit.md").read_text()
    with tarfile.open(tmp_path / "out" / "all-results.tar.gz") as archive:
        names = archive.getnames()
    assert "results/bert-base-seq128.json" in names and any(n.endswith("metrics.jsonl") for n in names)


def test_deferred_sync_loop_trains_and_logs_exactly_like_the_launcher_loop(assets, tmp_path, monkeypatch):
    """The proposed loop reads counters back every 3 steps here; each step's record must be the launcher's."""
    import launcher.run

    recipe = tiny_recipe(assets, tmp_path / "unused", training={"epochs": 2}, evaluation={"every_steps": 4})
    plain = write_recipe(tmp_path / "plain.yaml", {**recipe, "output": {**recipe["output"], "dir": str(tmp_path / "plain")}})
    assert run_in_process(plain) == 0
    monkeypatch.setenv("DEFERRED_SYNC_EVERY", "3")
    monkeypatch.setattr(launcher.run, "TrainingLoop", DeferredSyncLoop)
    deferred = write_recipe(tmp_path / "deferred.yaml", {**recipe, "output": {**recipe["output"], "dir": str(tmp_path / "deferred")}})
    assert run_in_process(deferred) == 0

    def records(run: str) -> list[dict]:
        timings = ("step_seconds", "time", "save_seconds", "save_gb_per_s")
        return [{k: v for k, v in r.items() if k not in timings} for r in read_metrics_log(tmp_path / run)]

    assert records("deferred") == records("plain")  # same steps, losses, lr, grad norms, counts; evals at 4, 8, 12, 16


def test_lora_flops_drop_the_frozen_weight_gradients():
    summary = {"model_flops_per_s": {"median": 1000.0}, "real_tokens_per_s": {"median": 2.0}}
    # 6N counted 6 FLOPs per token for 100 frozen weights; they cost 4. The 5 adapter weights were not in N.
    assert lora_adjusted_flops_per_s(summary, frozen_non_embedding=100, adapters=5) == 1000.0 - (200 - 30) * 2.0


def variant(name: str, samples_per_s: float, **extra) -> dict:
    """The parts of a `benchmarks.compare` variant that the kit's summary reads."""
    summary = {"samples_per_s": {"median": samples_per_s}, **{k: {"median": v} for k, v in extra.pop("summary", {}).items()}}
    return {"name": name, "summary": summary, **extra}


def test_summary_says_which_target_was_missed_and_by_how_much():
    from benchmarks.device.kit import host_sync, targets

    bert_memory = {"memory_plan_error_without_runtime_overhead": -0.25}
    results = {
        "bert-base-seq128": {"kit_baseline_precision": "fp32", "variants": [
            variant("tutorial_max_length", 100.0), variant("tutorial_dynamic", 200.0),
            variant("launcher_default", 360.0, summary={"mfu": 0.42}, kit=bert_memory),
            variant("launcher_deferred_sync", 396.0), variant("launcher_deferred_sync_pinned", 363.6),
        ]},
        "llama3-8b-lora-seq512": {"variants": [
            variant("launcher_default", 9.0, summary={"mfu": 0.40}, kit={"memory_plan_error_without_runtime_overhead": 0.1}),
        ]},
    }
    rows = {row["target"].split(" (")[0]: row for row in targets(results)}
    assert rows["BERT-base MFU at seq 128"]["met"] is True
    lora = rows["Llama-3-8B-shaped LoRA MFU by 6N"]
    assert lora["met"] is False and lora["missed_by"] == pytest.approx(0.05)
    speedup = rows["launcher / faster tutorial baseline, samples/s"]
    assert speedup["measured"] == pytest.approx(1.8) and speedup["met"] and "fp32" in speedup["caveat"]
    memory = [row for row in targets(results) if row["target"].startswith("|memory plan")]
    assert [(row["measured"], row["met"]) for row in memory] == [(0.25, False), (0.1, True)]
    gains = host_sync(results)
    assert gains["samples_per_s_gain_over_per_step_sync"] == pytest.approx(
        {"launcher_deferred_sync": 0.10, "launcher_deferred_sync_pinned": 0.01})
    assert gains["worth_changing_the_loop (> 2%)"] == {"launcher_deferred_sync": True, "launcher_deferred_sync_pinned": False}
