"""The launcher against the seed tutorials' way, back to back in one invocation, on the same samples.

    python -m benchmarks.compare recipes/demo.yaml [a.b=value ...] --samples 1000 --repeats 3

Runs, interleaved `--repeats` times: the two tutorial baselines (`benchmarks.tutorial_baselines`) and the
launcher's variants through its real entry point (`python launcher/run.py RECIPE ...`, or under `--launch`,
e.g. `--launch "accelerate launch --num_processes 2" --processes 2`). Each run is a fresh process; its
numbers come from its metrics.jsonl, its peak memory from watching it. Writes NAME.json / .md / .png into
benchmarks/results/. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from transformers import AutoConfig

from launcher.distributed.devices import DeviceInfo, detect_device, native_bf16
from benchmarks.flops import PeakFlops, TransformerShape, peak_bf16_flops, shape_from_pretrained
from launcher.recipe.loading import load_recipe
from launcher.recipe.schema import PREFERENCE_TASK_TYPES, Recipe
from launcher.tasks.sequence_classification.packing import packing_problem
from launcher.train.reporting import read_metrics_log

from benchmarks.environment import describe_machine, load_1min
from benchmarks.measure import MeasureError, measure_run, ratios, summarize_repeats
from benchmarks.processes import run_child
from benchmarks.report import RESULTS, first_failure, markdown_table, write_results
from benchmarks.tutorial_baselines import baseline_lengths

REPO = Path(__file__).resolve().parent.parent
RUN_PY = REPO / "launcher" / "run.py"
BASELINES = ("tutorial_max_length", "tutorial_dynamic", "trl_padded", "trl_padding_free", "trl_reward", "trl_dpo")


@dataclass(frozen=True)
class Variant:
    name: str
    why: str
    tutorial_way: Optional[str] = None  # set for the baselines, which run benchmarks.tutorial_baselines
    trl_way: Optional[str] = None  # set for the SFT baselines, which run benchmarks.trl_baseline
    trl_preference_way: Optional[str] = None  # set for the reward / dpo baselines (benchmarks.trl_preference_baseline)
    overrides: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    needs: Optional[str] = None  # "bf16", "cpu", "packing" or a task type ("classification", "causal_lm", "reward",
    # "dpo"): skipped where the hardware, the model or the recipe's task lacks it
    script: Optional[str] = None  # entry point relative to the repository root; default launcher/run.py

    @property
    def baseline(self) -> Optional[tuple[str, str]]:
        """(module, way) of a baseline, which runs one process whatever --processes says."""
        if self.tutorial_way:
            return "benchmarks.tutorial_baselines", self.tutorial_way
        if self.trl_way:
            return "benchmarks.trl_baseline", self.trl_way
        if self.trl_preference_way:
            return "benchmarks.trl_preference_baseline", self.trl_preference_way
        return None


VARIANTS = (
    Variant("tutorial_max_length", "baseline 1: Trainer, every text padded to 322 (Yelp tutorials)", tutorial_way="max_length",
            needs="classification"),
    Variant("tutorial_dynamic", "baseline 2: Trainer + DataCollatorWithPadding (MRPC tutorial)", tutorial_way="dynamic",
            needs="classification"),
    Variant("trl_padded", "SFT baseline 1: TRL SFTTrainer, completion-only loss, each batch padded to its longest",
            trl_way="padded", needs="causal_lm"),
    Variant("trl_padding_free", "SFT baseline 2: TRL SFTTrainer, completion-only loss, padding_free=True",
            trl_way="padding_free", needs="causal_lm"),
    Variant("trl_reward", "reward baseline: TRL RewardTrainer, each batch padded to its longest", trl_preference_way="reward",
            needs="reward"),
    Variant("trl_dpo", "DPO baseline: TRL DPOTrainer, each batch padded to its longest", trl_preference_way="dpo",
            needs="dpo"),
    Variant("launcher_default", "the recipe as given"),
    Variant("launcher_dynamic", "dynamic padding, random batches", overrides=("data.padding=dynamic", "data.group_by_length=false")),
    Variant("launcher_group_by_length", "dynamic padding, length-grouped batches", overrides=("data.padding=dynamic", "data.group_by_length=true")),
    Variant("launcher_bf16", "bf16 autocast", overrides=("training.precision=bf16",), needs="bf16"),
    Variant("launcher_compile", "torch.compile", overrides=("training.compile=true",)),
    Variant("launcher_packed", "padding-free packing (decoders)", overrides=("data.padding=packed",), needs="packing"),
    Variant("launcher_system_malloc", "glibc's default allocator thresholds (training.reuse_host_memory=false)",
            overrides=("training.reuse_host_memory=false",), needs="cpu"),
    Variant("launcher_1_thread", "one intra-op thread (OMP_NUM_THREADS=1)", env=(("OMP_NUM_THREADS", "1"),), needs="cpu"),
    # The loop change proposed in benchmarks/device/deferred_sync.py, measured before launcher/train/loop.py takes it.
    Variant("launcher_deferred_sync", "counters read back to the host every 10 steps, not every step",
            env=(("DEFERRED_SYNC_EVERY", "10"),), script="benchmarks/device/deferred_sync.py"),
    Variant("launcher_deferred_sync_pinned", "as launcher_deferred_sync, and pinned batches copied without blocking",
            env=(("DEFERRED_SYNC_EVERY", "10"), ("DEFERRED_SYNC_PINNED", "1")), script="benchmarks/device/deferred_sync.py"),
)
TASK_NEEDS = {"classification": "sequence_classification", "causal_lm": "causal_lm", "reward": "reward", "dpo": "dpo"}
DEFAULT_VARIANTS = tuple(v.name for v in VARIANTS if v.name != "launcher_compile" and not v.script)


@dataclass(frozen=True)
class Plan:
    """Everything fixed for one invocation; each run differs only by its variant."""

    recipe_path: str
    overrides: tuple[str, ...]
    recipe: Recipe
    samples: int
    warmup_steps: int
    repeats: int
    processes: int
    launch: tuple[str, ...]
    work_dir: Path
    timeout_s: float
    device: DeviceInfo
    shape: TransformerShape
    peak: Optional[PeakFlops]

    def steps(self, processes: int) -> int:
        training = self.recipe.training
        return self.samples // (training.per_device_batch_size * training.gradient_accumulation_steps * processes)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare the launcher with the tutorials' Trainer on the same samples.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides for every run")
    parser.add_argument("--samples", type=int, default=None, help="training samples per run (default: data.train_samples)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--warmup-steps", type=int, default=10, help="optimizer steps left out of the timing")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(v.name for v in VARIANTS)}")
    parser.add_argument("--processes", type=int, default=1, help="processes the --launch prefix starts (launcher variants)")
    parser.add_argument("--launch", default=None, help='prefix for launcher runs, e.g. "accelerate launch --num_processes 2"')
    parser.add_argument("--name", default=None, help="result file stem (default: RECIPE-DEVICE)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / "work",
                        help="run folders go in WORK_DIR/NAME/ (kept for inspection)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before one run is killed")
    return parser.parse_args(argv)


def select_variants(names: str, plan: Plan) -> list[Variant]:
    by_name = {v.name: v for v in VARIANTS}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(by_name)}")
    return [by_name[n] for n in names.split(",") if runs_on(by_name[n], plan)]


def runs_on(variant: Variant, plan: Plan) -> bool:
    if variant.needs in TASK_NEEDS:
        return TASK_NEEDS[variant.needs] == plan.recipe.task.type
    if variant.needs == "cpu":
        return plan.device.type == "cpu"
    if variant.needs == "bf16":
        return native_bf16(plan.device)
    if variant.needs == "packing":
        if plan.recipe.task.type in PREFERENCE_TASK_TYPES:  # a pair's answers run side by side, never packed
            return False
        config = AutoConfig.from_pretrained(plan.recipe.model.name_or_path, trust_remote_code=plan.recipe.model.trust_remote_code)
        return packing_problem(config.model_type) is None
    return True


def make_plan(args: argparse.Namespace) -> Plan:
    recipe = load_recipe(args.recipe, args.overrides)
    samples = args.samples or recipe.data.train_samples
    if samples is None:
        raise SystemExit("--samples is required when the recipe has no data.train_samples")
    device = detect_device()
    return Plan(
        args.recipe, tuple(args.overrides), recipe, samples, args.warmup_steps, args.repeats, args.processes,
        tuple(shlex.split(args.launch)) if args.launch else (sys.executable,), args.work_dir / result_name(args, device),
        args.timeout, device,
        # FLOPs count the non-embedding weights: a classification head's handful of rows, or none (causal_lm).
        shape_from_pretrained(recipe.model.name_or_path, recipe.task.label_count or 2), peak_bf16_flops(device.name),
    )


def result_name(args: argparse.Namespace, device: DeviceInfo) -> str:
    return args.name or f"{Path(args.recipe).stem}-{device.type}"


def command_for(plan: Plan, variant: Variant, out: Path) -> list[str]:
    if variant.baseline:
        module, way = variant.baseline
        return [sys.executable, "-m", module, plan.recipe_path, *plan.overrides, "--way", way, "--steps", str(plan.steps(1)),
                "--out", str(out)]
    # Log every step, evaluate once at the end, and write no checkpoints: none of it is inside a timed step.
    measurement = (
        f"output.dir={out}", "output.overwrite=true", "output.resume_from=null", "output.report_to=none",
        "output.save_every_epoch=false", "output.save_every_steps=null", "evaluation.every_steps=null",
        "training.log_every_steps=1", f"training.max_steps={plan.steps(plan.processes)}",
    )
    script = REPO / variant.script if variant.script else RUN_PY
    return [*plan.launch, str(script), plan.recipe_path, *plan.overrides, *variant.overrides, *measurement]


def token_lengths(plan: Plan, variant: Variant) -> dict[str, Any]:
    """Where the variant's texts end and what they are padded to (`batch`: each batch's longest; `none`: packed)."""
    if variant.tutorial_way:
        return baseline_lengths(plan.recipe, variant.tutorial_way)
    if variant.trl_way or variant.trl_preference_way:
        pad_to = "none" if variant.trl_way == "padding_free" else "batch"
        return {"truncate_at": plan.recipe.data.max_length, "pad_to": pad_to}
    data = load_recipe(plan.recipe_path, [*plan.overrides, *variant.overrides]).data
    return {"truncate_at": data.max_length, "pad_to": {"max_length": data.max_length, "dynamic": "batch", "packed": "none"}[data.padding]}


def run_once(plan: Plan, variant: Variant, repeat: int) -> dict[str, Any]:
    """One fresh process of `variant`, measured; a failed run is recorded with its log tail, not raised."""
    out = plan.work_dir / f"{variant.name}-{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = command_for(plan, variant, out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false", **dict(variant.env)}
    load = load_1min()
    child = run_child(command, env, out / "output.log", plan.timeout_s)
    run = {"repeat": repeat, "log_dir": str(out), "load_1min": load, "wall_seconds": child.wall_seconds,
           "peak_rss_bytes": child.peak_rss_bytes, "returncode": child.returncode}
    devices = 1 if variant.baseline else plan.processes
    try:
        if child.returncode != 0:
            raise MeasureError(f"exit code {child.returncode}")
        records = read_metrics_log(out)
        if plan.recipe.task.type == "causal_lm" and not variant.baseline:  # the loss items are the trained tokens
            records = [{**r, "trained_tokens": r["loss_items"]} if r["kind"] == "train" else r for r in records]
        run.update(measure_run(records, plan.warmup_steps, plan.shape, plan.peak, devices))
    except (MeasureError, OSError) as err:
        tail = (out / "output.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        run["error"] = f"{err}\n{tail}"
    return run


def compare(plan: Plan, variants: list[Variant]) -> list[dict[str, Any]]:
    """All runs, interleaved so that changing machine load falls on every variant alike."""
    # The command as run, with R standing for the repeat number in the run folder.
    results = [{"name": v.name, "why": v.why, "command": shlex.join(command_for(plan, v, plan.work_dir / f"{v.name}-R")),
                "env": dict(v.env), "lengths": token_lengths(plan, v), "runs": []} for v in variants]
    for repeat in range(plan.repeats):
        for variant, result in zip(variants, results):
            print(f"[{repeat + 1}/{plan.repeats}] {variant.name} (load {load_1min():.1f}) ...", flush=True)
            result["runs"].append(run_once(plan, variant, repeat))
    for result in results:
        good = [r for r in result["runs"] if "error" not in r]
        if good:
            result["summary"] = summarize_repeats(good)
    baselines = {r["name"]: r["summary"] for r in results if r["name"] in BASELINES and "summary" in r}
    for result in results:
        if "summary" in result:
            result["ratios"] = {name: ratios(result["summary"], summary) for name, summary in baselines.items()}
    return results


def flops_description(plan: Plan) -> dict[str, Any]:
    peak = (f"peak {plan.peak.tflops:g} TFLOP/s dense bf16 per device ({plan.peak.source})" if plan.peak
            else "no peak for this device (CPU or not in benchmarks/flops.py): achieved FLOP/s reported, no MFU")
    return {"formula": "6N + 12*L*H*Q*T per real token (PaLM appendix B), N = non-embedding parameters",
            "shape": asdict(plan.shape), "peak": peak}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    variants = select_variants(args.variants, plan)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = compare(plan, variants)
    result = {
        "command": shlex.join(["python", "-m", "benchmarks.compare", *(argv if argv is not None else sys.argv[1:])]),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(plan.device),
        "settings": {"recipe_path": plan.recipe_path, "overrides": list(plan.overrides), "samples": plan.samples,
                     "per_device_batch_size": plan.recipe.training.per_device_batch_size, "warmup_steps": plan.warmup_steps,
                     "repeats": plan.repeats, "processes": plan.processes, "launch": list(plan.launch)},
        "flops": flops_description(plan),
        "recipe": plan.recipe.model_dump(mode="json"),
        "baselines": [name for name in BASELINES if name in {v.name for v in variants}],
        "variants": results,
    }
    paths = write_results(result, args.results_dir, result_name(args, plan.device))
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    failed = first_failure(result)
    if failed:
        print(f"error: variant {failed} failed; see its log in the JSON", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
