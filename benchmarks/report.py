"""The comparison as files: JSON (everything), a Markdown table (for people and the docs), a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


def span(summary: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    """`median [min-max]` of a summarized number, or `-` when it was not measured."""
    if key not in summary:
        return "-"
    s = summary[key]
    return f"{s['median'] / scale:{fmt}} [{s['min'] / scale:{fmt}}-{s['max'] / scale:{fmt}}]"


def ratio_cell(variant: dict[str, Any], baseline: str) -> str:
    ratio = variant.get("ratios", {}).get(baseline)
    return f"{ratio['samples_per_s_x']:.2f}x" if ratio else "-"


def flops_cell(summary: dict[str, Any]) -> str:
    if "mfu" in summary:
        return f"{summary['mfu']['median']:.1%} MFU"
    return span(summary, "model_flops_per_s", ".3g", 1e9) + " GFLOP/s"


def lengths_cell(variant: dict[str, Any]) -> str:
    """`truncate / pad` token lengths, and the real tokens a sample the run read (older result files: `-`)."""
    lengths = variant.get("lengths")
    if not lengths:
        return "-"
    run = variant["runs"][0]
    read = f", {run['real_tokens_per_s'] / run['samples_per_s']:.0f} read" if "samples_per_s" in run else ""
    return f"{lengths['truncate_at']} / {lengths['pad_to']}{read}"


def markdown_table(result: dict[str, Any]) -> str:
    baselines = result["baselines"]
    # Optional columns: per device when the launcher ran several processes, the device allocator's peak on GPUs/NPUs.
    per_device = result["settings"]["processes"] > 1
    device_memory = any("peak_device_memory_bytes" in v.get("summary", {}) for v in result["variants"])
    # SFT runs count the tokens the loss is computed on; their eval loss is the mean over those tokens.
    sft = any("trained_tokens_per_s" in v.get("summary", {}) for v in result["variants"])
    header = [
        "variant", "tokens: truncate / pad, read", "samples/s", *(["samples/s per device"] if per_device else []),
        *[f"x {b}" for b in baselines],
        "real tok/s", "padded tok/s", *(["trained tok/s"] if sft else []), "padding eff.", "step s min/med/max",
        "model FLOP/s", "accuracy", *(["eval loss"] if sft else []), "peak RSS MiB",
        *(["peak device MiB"] if device_memory else []), "load 1 min",
    ]
    rows = [header, ["---"] * len(header)]
    for variant in result["variants"]:
        s = variant.get("summary")
        if not s:
            rows.append([variant["name"], lengths_cell(variant), f"failed: {variant['runs'][-1].get('error', '')[:80]}"]
                        + [""] * (len(header) - 3))
            continue
        steps = s["step_seconds"]
        rows.append([
            variant["name"], lengths_cell(variant), span(s, "samples_per_s", ".1f"),
            *([span(s, "samples_per_s_per_device", ".1f")] if per_device else []), *[ratio_cell(variant, b) for b in baselines],
            span(s, "real_tokens_per_s", ".0f"), span(s, "padded_tokens_per_s", ".0f"),
            *([span(s, "trained_tokens_per_s", ".1f")] if sft else []),
            f"{s['padding_efficiency']['median']:.2f}", f"{steps['min']:.3f} / {steps['median']:.3f} / {steps['max']:.3f}",
            flops_cell(s), span(s, "accuracy", ".3f"), *([span(s, "eval_loss", ".4f")] if sft else []),
            span(s, "peak_rss_bytes", ".0f", MIB),
            *([span(s, "peak_device_memory_bytes", ".0f", MIB)] if device_memory else []),
            span(s, "load_1min", ".1f"),
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    machine, settings = result["machine"], result["settings"]
    libraries = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items())
    lines = [
        f"# Benchmark: {settings['recipe_path']}",
        "",
        f"- command: `{result['command']}`",
        f"- when: {result['started']} to {result['finished']} (UTC)",
        f"- machine: {machine['cpu']}, {machine['cpu_cores_physical']} physical cores; device {machine['device_type']} "
        f"({machine['device_name']}); python {machine['python']}; {libraries}",
        f"- threads: torch {machine['torch_threads']} intra-op; environment {machine['environment']}",
        f"- each run: {settings['samples']} training samples, per-device batch {settings['per_device_batch_size']}, "
        f"{settings['processes']} process(es); first {settings['warmup_steps']} optimizer steps skipped; "
        f"{settings['repeats']} repeat(s), interleaved; cells are median [min-max] over repeats",
        f"- model FLOPs: {result['flops']['formula']}; {result['flops']['peak']}",
        "- tokens: where each variant truncates its texts / what it pads them to (`batch`: each batch's longest, "
        "`none`: packed), and the real tokens per training sample it read",
        f"- machine load (1-minute average) at each run's start is in the last column: above "
        f"{machine['cpu_cores_logical']} the runs shared the CPU with other work",
        "",
        markdown_table(result),
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Median samples/s per variant with the min-max range; baselines in grey."""
    measured = [v for v in result["variants"] if v.get("summary")]
    names = [v["name"] for v in measured]
    medians = [v["summary"]["samples_per_s"]["median"] for v in measured]
    low = [m - v["summary"]["samples_per_s"]["min"] for m, v in zip(medians, measured)]
    high = [v["summary"]["samples_per_s"]["max"] - m for m, v in zip(medians, measured)]
    colors = ["0.6" if v["name"] in result["baselines"] else "tab:blue" for v in measured]
    figure, axes = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    axes.barh(names, medians, xerr=[low, high], color=colors, capsize=3)
    axes.invert_yaxis()
    axes.set_xlabel("training samples/s after warm-up (median, min-max over repeats)")
    axes.set_title(f"{result['settings']['recipe_path']} on {result['machine']['device_name']} ({result['machine']['cpu']})", fontsize=9)
    # The label sits past the range's end so the error bar never runs through it.
    for y, (value, above) in enumerate(zip(medians, high)):
        axes.annotate(f"{value:.1f}", (value + above, y), xytext=(5, -3), textcoords="offset points", fontsize=8)
    axes.set_xlim(right=max(m + h for m, h in zip(medians, high)) * 1.1)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def publish(result: dict[str, Any], folder: Path, name: str, text: str) -> Path:
    """A benchmark's result as `FOLDER/NAME.json` (everything) and `NAME.md` (`text`, also printed); returns the
    folder, for a plot beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (folder / f"{name}.md").write_text(text, encoding="utf-8")
    print(text)
    return folder


def write_results(result: dict[str, Any], folder: Path, name: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"{name}.{kind}" for kind in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown_report(result), encoding="utf-8")
    plot(result, paths["png"])
    return paths


def first_failure(result: dict[str, Any]) -> Optional[str]:
    for variant in result["variants"]:
        if not variant.get("summary"):
            return variant["name"]
    return None
