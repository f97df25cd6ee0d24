"""From one run's metrics log (launcher or tutorial baseline) to its throughput, step times, FLOP/s and accuracy.

Only optimizer steps after the warm-up count: the first steps pay for allocator growth, lazy kernel
selection and (with torch.compile) compilation.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional, Sequence

from benchmarks.flops import PeakFlops, TransformerShape, model_flops_utilization, training_flops


class MeasureError(ValueError):
    """A run's log cannot give the numbers asked for."""


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of a non-empty sequence."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measured_steps(records: list[dict[str, Any]], warmup_steps: int) -> list[dict[str, Any]]:
    steps = [r for r in records if r["kind"] == "train"]
    if len(steps) <= warmup_steps:
        raise MeasureError(
            f"the log has {len(steps)} train records, none left after {warmup_steps} warm-up steps: train more "
            "samples, lower --warmup-steps, or log every step (training.log_every_steps=1)"
        )
    return steps[warmup_steps:]


def final_eval(records: list[dict[str, Any]]) -> dict[str, Any]:
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        raise MeasureError("the log has no eval record: the recipe needs an eval set to compare accuracy")
    return evals[-1]


def measure_run(
    records: list[dict[str, Any]],
    warmup_steps: int,
    shape: TransformerShape,
    peak: Optional[PeakFlops],
    devices: int,
) -> dict[str, Any]:
    """Throughput over the post-warm-up steps (sums over ranks, as the log holds them) and final accuracy."""
    steps = measured_steps(records, warmup_steps)
    seconds = sum(r["step_seconds"] for r in steps)
    samples = sum(r["samples"] for r in steps)
    real = sum(r["real_tokens"] for r in steps)
    padded = sum(r["padded_tokens"] for r in steps)
    flops = sum(training_flops(shape, r["real_tokens"], r["samples"]) for r in steps)
    evaluation = final_eval(records)
    # SFT logs the tokens its loss is computed on (the completion / answer tokens); classification does not.
    trained = sum(r["trained_tokens"] for r in steps) if all("trained_tokens" in r for r in steps) else None
    return {
        "steps_measured": len(steps),
        "samples_measured": samples,
        "seconds_measured": seconds,
        "samples_per_s": samples / seconds,
        "samples_per_s_per_device": samples / seconds / devices,
        "real_tokens_per_s": real / seconds,
        "padded_tokens_per_s": padded / seconds,
        "trained_tokens_per_s": trained / seconds if trained is not None else None,
        "padding_efficiency": real / padded,
        "step_seconds": spread([r["step_seconds"] for r in steps]),
        "model_flops_per_s": flops / seconds,
        "mfu": model_flops_utilization(flops / seconds, peak, devices),
        "accuracy": evaluation.get("accuracy"),
        "eval_loss": evaluation.get("loss"),
        "eval_examples": evaluation.get("examples"),
        "peak_device_memory_bytes": evaluation.get("peak_device_memory_bytes"),
    }


SUMMARIZED = ("samples_per_s", "samples_per_s_per_device", "real_tokens_per_s", "padded_tokens_per_s",
              "trained_tokens_per_s", "padding_efficiency", "model_flops_per_s", "mfu", "accuracy", "eval_loss",
              "peak_rss_bytes", "peak_device_memory_bytes", "wall_seconds", "load_1min")


def summarize_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """min / median / max over repeats of each headline number; step times: min of the minima, median of the
    per-run medians, max of the maxima."""
    summary = {key: spread([r[key] for r in runs]) for key in SUMMARIZED if all(r.get(key) is not None for r in runs)}
    summary["step_seconds"] = {
        "min": min(r["step_seconds"]["min"] for r in runs),
        "median": statistics.median(r["step_seconds"]["median"] for r in runs),
        "max": max(r["step_seconds"]["max"] for r in runs),
    }
    return summary


def ratios(summary: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """Median throughput over the baseline's median, and the accuracy and eval loss differences (medians, after the
    same samples)."""
    result = {
        f"{key}_x": summary[key]["median"] / baseline[key]["median"]
        for key in ("samples_per_s", "real_tokens_per_s", "trained_tokens_per_s") if key in summary and key in baseline
    }
    if "accuracy" in summary and "accuracy" in baseline:
        result["accuracy_delta"] = summary["accuracy"]["median"] - baseline["accuracy"]["median"]
    if "eval_loss" in summary and "eval_loss" in baseline:
        result["eval_loss_delta"] = summary["eval_loss"]["median"] - baseline["eval_loss"]["median"]
    return result


def lora_adjusted_flops_per_s(summary: dict[str, Any], frozen_non_embedding: int, adapters: int) -> float:
    """Median model FLOP/s recounted for LoRA: frozen weights get no weight gradient (4 FLOPs per token and
    weight instead of 6), and the adapters' own weights, absent from the base model's N, get all 6."""
    real_tokens_per_s = summary["real_tokens_per_s"]["median"]
    return summary["model_flops_per_s"]["median"] - (2 * frozen_non_embedding - 6 * adapters) * real_tokens_per_s
