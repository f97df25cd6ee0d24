"""The kit's Python stages, called by benchmarks/device/run.sh (which owns the time guard and the file layout):

    python -m benchmarks.device.kit environment --out DIR
    python -m benchmarks.device.kit benchmarks --out DIR --work DIR [--smoke] [--deadline EPOCH_SECONDS]
    python -m benchmarks.device.kit summary --out DIR

`environment` says what the machine and its libraries are; `benchmarks` measures (benchmarks/device/
throughput.py); `summary` puts environment, tests and benchmarks into one JSON and one Markdown file, with each
of the issue's targets met or missed by how much.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.report import markdown_table

REPO = Path(__file__).resolve().parents[2]
KIT_LIBRARIES = ("torch", "transformers", "accelerate", "peft", "datasets", "deepspeed", "pydantic", "tokenizers",
                 "safetensors", "huggingface-hub", "pyarrow", "numpy")
TARGETS = {"bert_mfu": 0.40, "llama_lora_mfu_6n": 0.45, "speedup_over_faster_tutorial": 1.5, "memory_plan_error": 0.15,
           "host_sync_gain_worth_changing": 0.02}
GIB = 2**30
BASELINES = ("tutorial_max_length", "tutorial_dynamic")  # benchmarks.compare's, named here to keep this stage light


# ---------------------------------------------------------------- environment

def library_versions() -> dict[str, str]:
    versions = {}
    for name in KIT_LIBRARIES:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
            continue
        versions[name] = f"{distribution.version} ({Path(str(distribution.locate_file(''))).as_posix()})"
    return versions


def nvidia_smi() -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit"
    result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=30)
    return result.stdout.strip() or result.stderr.strip()


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "libraries": library_versions(), "torch_cuda": torch.version.cuda, "nvidia_smi": nvidia_smi(),
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        properties = torch.cuda.get_device_properties(0)
        info.update({"device": torch.cuda.get_device_name(0), "device_count": torch.cuda.device_count(),
                     "compute_capability": f"{properties.major}.{properties.minor}",
                     "multiprocessors": properties.multi_processor_count, "memory_free_gib": free / GIB,
                     "memory_total_gib": total / GIB, "bf16": torch.cuda.is_bf16_supported(),
                     "cudnn": torch.backends.cudnn.version()})
    else:
        info["device"] = "cpu (no CUDA device visible: smoke mode)"
    return info


# ---------------------------------------------------------------- summary

def pytest_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"error": f"{path.name} missing: the tests did not finish (see kit.log)"}
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        message = next((child.get("message", "") for child in case if child.tag in ("failure", "error", "skipped")), "")
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message[:300], **({"properties": properties} if properties else {})})
    counts = {outcome: sum(c["outcome"] == outcome for c in cases) for outcome in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "seconds": float(suite.get("time", 0)), "cases": cases}


def median_of(variant: dict[str, Any], key: str) -> Optional[float]:
    return variant.get("summary", {}).get(key, {}).get("median")


def target(name: str, measured: Optional[float], goal: float, why_missed: str, higher_is_better: bool = True) -> dict[str, Any]:
    if measured is None:
        return {"target": name, "goal": goal, "measured": None, "met": None, "note": "not measured"}
    met = measured >= goal if higher_is_better else measured <= goal
    entry = {"target": name, "goal": goal, "measured": measured, "met": met}
    if not met:
        entry["missed_by"] = goal - measured if higher_is_better else measured - goal
        entry["note"] = why_missed
    return entry


def targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against what was measured (None where a benchmark did not run)."""
    rows = []
    bert = {v["name"]: v for v in results.get("bert-base-seq128", {}).get("variants", [])}
    llama = {v["name"]: v for v in results.get("llama3-8b-lora-seq512", {}).get("variants", [])}
    default = bert.get("launcher_default", {})
    rows.append(target("BERT-base MFU at seq 128 (launcher default, bf16)", median_of(default, "mfu"), TARGETS["bert_mfu"],
                       "see step times: small steps are bound by per-step host work and kernel launches"))
    lora = llama.get("launcher_default", {})
    rows.append(target("Llama-3-8B-shaped LoRA MFU by 6N (bf16, seq 512)", median_of(lora, "mfu"),
                       TARGETS["llama_lora_mfu_6n"], "frozen weights skip their weight gradients: compare mfu_adjusted"))
    baselines = [median_of(bert[name], "samples_per_s") for name in BASELINES if median_of(bert.get(name, {}), "samples_per_s")]
    launcher = median_of(default, "samples_per_s")
    speedup = launcher / max(baselines) if launcher and baselines else None
    rows.append(target("launcher / faster tutorial baseline, samples/s (BERT-base)", speedup,
                       TARGETS["speedup_over_faster_tutorial"], "see padding efficiency and step times per variant"))
    precision = results.get("bert-base-seq128", {}).get("kit_baseline_precision")
    if precision and precision != "bf16":
        rows[-1]["caveat"] = (f"the tutorial baselines trained in {precision}, the launcher in bf16 "
                              "(benchmarks/tutorial_baselines.py does not pass training.precision to the Trainer)")
    for label, variant in (("BERT-base", default), ("Llama-3-8B LoRA", lora)):
        # Like with like: the allocator's peak holds no CUDA context, so the plan's runtime overhead is left out.
        error = variant.get("kit", {}).get("memory_plan_error_without_runtime_overhead")
        rows.append(target(f"|memory plan - allocator peak| / peak ({label})", None if error is None else abs(error),
                           TARGETS["memory_plan_error"], "see memory_plan.device_bytes for the component that is off",
                           higher_is_better=False))
    return rows


def host_sync(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    bert = {v["name"]: v for v in results.get("bert-base-seq128", {}).get("variants", [])}
    base = median_of(bert.get("launcher_default", {}), "samples_per_s")
    gains = {name: median_of(bert.get(name, {}), "samples_per_s") / base - 1
             for name in ("launcher_deferred_sync", "launcher_deferred_sync_pinned")
             if base and median_of(bert.get(name, {}), "samples_per_s")}
    worth = {name: gain > TARGETS["host_sync_gain_worth_changing"] for name, gain in gains.items()}
    return {"samples_per_s_gain_over_per_step_sync": gains, "worth_changing_the_loop (> 2%)": worth}


def summary(out: Path) -> dict[str, Any]:
    env_path = out / "environment.json"
    results = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))
               if path.name not in ("environment.json", "device-kit.json")}
    return {
        "environment": json.loads(env_path.read_text()) if env_path.exists() else None,
        "tests": pytest_summary(out / "pytest-cuda.xml"),
        "targets": targets(results),
        "host_sync": host_sync(results),
        "skipped_benchmarks": {p.stem: p.read_text().strip() for p in out.glob("*.skipped")},
        "failed_benchmarks": {p.stem: p.read_text()[-3000:] for p in out.glob("*.failed")},
        "benchmarks": results,
    }


def describe_target(row: dict[str, Any]) -> str:
    caveat = f" (caveat: {row['caveat']})" if "caveat" in row else ""
    if row["met"] is None:
        return f"| {row['target']} | {row['goal']:g} | not measured | -{caveat} |"
    verdict = "met" if row["met"] else f"MISSED by {row['missed_by']:.3g}: {row['note']}"
    return f"| {row['target']} | {row['goal']:g} | {row['measured']:.3g} | {verdict}{caveat} |"


def summary_markdown(report: dict[str, Any]) -> str:
    env = report["environment"] or {}
    tests = report["tests"]
    lines = ["# Accelerator kit results", "",
             f"- device: {env.get('device')}; torch CUDA {env.get('torch_cuda')}; python {env.get('python')}",
             f"- nvidia-smi: `{env.get('nvidia_smi')}`",
             "- libraries: " + ", ".join(f"{k} {v.split(' ')[0]}" for k, v in env.get("libraries", {}).items()), "",
             "## CUDA tests (`pytest -m cuda tests/device/test_cuda.py`)", ""]
    if "error" in tests:
        lines.append(tests["error"])
    else:
        lines.append(f"{tests['counts']} in {tests['seconds']:.0f} s")
        lines += ["", "| test | outcome | s | note |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} | {c['message'][:120]} {c.get('properties', '')} |"
                  for c in tests["cases"]]
    lines += ["", "## Targets", "", "| target | goal | measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [describe_target(row) for row in report["targets"]]
    lines += ["", "## Per-step host synchronisation", "", f"`{json.dumps(report['host_sync'])}`", ""]
    for name, skipped in report["skipped_benchmarks"].items():
        lines.append(f"- {name}: skipped ({skipped})")
    for name, failure in report["failed_benchmarks"].items():
        lines.append(f"- {name}: FAILED, see all-results.tar.gz; last line: {failure.strip().splitlines()[-1]}")
    for name, result in report["benchmarks"].items():
        lines += [f"## {name}", "", result.get("kit_note", ""), "", f"`{result['command']}`", "", markdown_table(result)]
        for variant in result["variants"]:
            if "kit" in variant:
                kit = variant["kit"]
                plan = kit["memory_plan"]["total_bytes"] / GIB
                error, inner = kit.get("memory_plan_error"), kit.get("memory_plan_error_without_runtime_overhead")
                lines.append(f"- {variant['name']}: memory plan {plan:.2f} GiB; vs the measured allocator peak: "
                             + (f"{error:+.1%} ({inner:+.1%} without the plan's runtime overhead)" if error is not None
                                else "no device peak (CPU)"))
                if "lora_flops" in kit:
                    flops = kit["lora_flops"]
                    lines.append(f"- {variant['name']}: FLOP/s by 6N {flops['model_flops_per_s_6n']:.4g}, LoRA-adjusted "
                                 f"{flops['model_flops_per_s_adjusted']:.4g}; MFU {flops['mfu_6n']} (6N) / "
                                 f"{flops['mfu_adjusted']} (adjusted)")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Stages of the accelerator kit (run by benchmarks/device/run.sh).")
    parser.add_argument("stage", choices=("environment", "benchmarks", "summary"))
    parser.add_argument("--out", type=Path, required=True, help="result folder ($OUT on the device machine)")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "device", help="models, data, runs")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any machine (CI)")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="epoch seconds: skip what would not finish")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all, in order)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "environment":
        info = environment()
        (args.out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps(info, indent=2))
        return 0
    if args.stage == "benchmarks":
        from benchmarks.device.throughput import run_benchmarks  # the heavy imports, for this stage only

        return run_benchmarks(args.out, args.work, args.smoke, args.deadline, [n for n in args.only.split(",") if n])
    report = summary(args.out)
    (args.out / "device-kit.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "device-kit.md").write_text(summary_markdown(report))
    print(summary_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
