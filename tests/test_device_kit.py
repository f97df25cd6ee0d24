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

from conftest import REPO, run_in_process, tiny_recipe, write_recipe
from launcher.reporting import read_metrics_log

sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not part of the installed package

from benchmarks.device.deferred_sync import DeferredSyncTrainer  # noqa: E402
from benchmarks.measure import lora_adjusted_flops_per_s  # noqa: E402

# What the device tool returns: at most 8 files.
RETURNED = {"device-kit.json", "device-kit.md", "kit.log", "pytest-cuda.xml", "all-results.tar.gz",
            "bert-base-seq128.png", "llama3-8b-lora-seq512.png"}


@pytest.mark.slow
def test_the_kit_command_runs_in_smoke_mode_and_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "KIT_WORK": str(tmp_path / "work")}
    env.pop("LAUNCHER_KIT_SMOKE", None)
    result = subprocess.run(["bash", "benchmarks/device/run.sh", "--smoke", str(tmp_path / "out")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} == RETURNED
    report = json.loads((tmp_path / "out" / "device-kit.json").read_text())

    tests = report["tests"]
    assert tests["counts"]["failure"] == tests["counts"]["error"] == 0
    assert tests["counts"]["passed"] >= 4, "the CPU-capable CUDA tests run in smoke mode"
    assert report["environment"]["libraries"]["torch"] != "missing"

    bert, llama = report["benchmarks"]["bert-base-seq128"], report["benchmarks"]["llama3-8b-lora-seq512"]
    assert [v["name"] for v in bert["variants"]] == ["tutorial_max_length", "tutorial_dynamic", "launcher_default",
                                                     "launcher_deferred_sync"]
    assert all("summary" in v for v in bert["variants"] + llama["variants"]), "every variant measured"
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
    monkeypatch.setattr(launcher.run, "Trainer", DeferredSyncTrainer)
    deferred = write_recipe(tmp_path / "deferred.yaml", {**recipe, "output": {**recipe["output"], "dir": str(tmp_path / "deferred")}})
    assert run_in_process(deferred) == 0

    def records(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("step_seconds", "time")} for r in read_metrics_log(tmp_path / run)]

    assert records("deferred") == records("plain")  # same steps, losses, lr, grad norms, counts; evals at 4, 8, 12, 16


def test_lora_flops_drop_the_frozen_weight_gradients():
    summary = {"model_flops_per_s": {"median": 1000.0}, "real_tokens_per_s": {"median": 2.0}}
    # 6N counted 6 FLOPs per token for 100 frozen weights; they cost 4. The 5 adapter weights were not in N.
    assert lora_adjusted_flops_per_s(summary, frozen_non_embedding=100, adapters=5) == 1000.0 - (200 - 30) * 2.0
