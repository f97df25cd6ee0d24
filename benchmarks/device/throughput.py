"""The kit's measurements (stage `benchmarks` of benchmarks/device/run.sh): builds the models and data
(benchmarks/device/assets.py) and runs `benchmarks.compare` three times: a BERT-base classifier at seq 128 in
bf16 against both tutorial baselines and the deferred-sync loop variants, and a Llama-3-8B-shaped model with
LoRA in bf16 at seq 512, as a classifier and as causal-LM SFT. Each launcher variant's result gains the memory plan of its recipe (what
`launcher/run.py RECIPE --check` prints, from `launcher.plan.memory`) against the measured allocator peak, and,
with LoRA, the FLOP count without the frozen weights' gradients beside the 6N one.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.compare import BASELINES, VARIANTS
from benchmarks.compare import main as compare_main
from benchmarks.device import assets
from benchmarks.measure import lora_adjusted_flops_per_s
from benchmarks.tutorial_baselines import training_arguments
from benchmarks.flops import count_non_embedding_parameters, model_flops_utilization, peak_bf16_flops
from launcher.model.loading import apply_lora
from launcher.plan.memory import Topology, estimate_memory, measure_model, model_config
from launcher.recipe.loading import load_recipe
from launcher.tasks import task_class

@dataclass(frozen=True)
class Benchmark:
    """One `benchmarks.compare` invocation of the kit."""

    name: str
    kind: str  # assets builder: bert or llama
    recipe: str
    overrides: tuple[str, ...]
    variants: tuple[str, ...]
    samples: int
    eval_samples: int
    warmup_steps: int
    num_labels: int
    length_words: Callable
    note: str
    needed_seconds: int
    """Time it needs on the H200, estimated: with less left before the guard it is skipped rather than cut."""


def benchmarks_for(smoke: bool, work: Path) -> list[Benchmark]:
    """The real measurement, or the same runs at toy sizes (CI): same recipes, variants, files and code."""
    bert_batch, llama_batch = (8, 4) if smoke else (64, 8)
    bert_steps, llama_steps = (6, 4) if smoke else (150, 40)
    llama = (f"model.name_or_path={work / 'llama'}", "model.gradient_checkpointing=false", "lora.merge_on_save=false",
             "data.max_length=512", f"training.per_device_batch_size={llama_batch}")
    common = ("data.dataset=null", "data.train_samples=null", "data.eval_samples=null", "training.precision=bf16",
              "training.gradient_accumulation_steps=1", "training.warmup_ratio=0.1", "evaluation.metrics=[accuracy]")
    return [
        Benchmark(
            "bert-base-seq128", "bert", "recipes/yelp_bert.yaml",
            (*common, f"model.name_or_path={work / 'bert'}", *data_files(work, "bert-base-seq128"), "data.max_length=128",
             "data.group_by_length=true",
             f"training.per_device_batch_size={bert_batch}", "training.lr=1e-4"),
            # Pinned batches change nothing on a CPU: the smoke mode leaves that variant out.
            ("tutorial_max_length", "tutorial_dynamic", "launcher_default", "launcher_deferred_sync",
             *(() if smoke else ("launcher_deferred_sync_pinned",))),
            bert_batch * bert_steps, 1000 if not smoke else 32, 10 if not smoke else 2, 5,
            assets.review_like(median=110, cap=600),
            "BERT-base shape (110M), random weights; review-like lengths (median 110 words, log-normal), truncated at 128",
            needed_seconds=100,
        ),
        Benchmark(
            "llama3-8b-lora-seq512", "llama", "recipes/llama3_yelp_lora.yaml",
            (*common, *llama, *data_files(work, "llama3-8b-lora-seq512"), "model.attn_implementation=sdpa"),
            ("launcher_default",),
            llama_batch * llama_steps, 64 if not smoke else 16, 10 if not smoke else 1, 5,
            assets.at_least(512),
            "Llama-3-8B shape (8.0B), random bf16 weights, LoRA r 16 on q/k/v/o; every text fills 512 tokens; "
            "gradient checkpointing off (the H200 holds the activations)",
            needed_seconds=150,  # builds and saves the 8B model first
        ),
        Benchmark(
            # The generative task: instruction + answer, loss on the answer; single-token answers made of the
            # tokenizer's words, the prompt's words too (the word-level tokenizer knows nothing else).
            "llama3-8b-lora-sft-seq512", "llama", "recipes/llama3_yelp_sft_lora.yaml",
            (*common, *llama, *data_files(work, "llama3-8b-lora-sft-seq512"), 'task.prompt_template="{text} w100 w101"',
             "task.label_words=[w200, w201, w202, w203, w204]", "task.generations=0"),
            ("launcher_default",),
            llama_batch * llama_steps, 64 if not smoke else 16, 10 if not smoke else 1, 5,
            assets.exactly(500),
            "Llama-3-8B shape, causal-LM SFT (format labelled) with LoRA r 16, the recipe's packed batches; prompts of "
            "500 words + 2 template words, one answer token (about 504 tokens per example)",
            needed_seconds=100,
        ),
    ]


def data_files(work: Path, name: str) -> tuple[str, str]:
    return f"data.train_file={work / name / 'train.csv'}", f"data.eval_file={work / name / 'eval.csv'}"


def prepare(benchmark: Benchmark, work: Path, smoke: bool) -> None:
    started = time.perf_counter()
    model = assets.build_model(benchmark.kind, work / benchmark.kind, smoke)
    vocab_size = model_config(str(model))[0].vocab_size
    assets.write_data(work / benchmark.name, benchmark.samples, benchmark.eval_samples, benchmark.num_labels,
                      benchmark.length_words, vocab_size)
    print(f"[kit] {benchmark.name}: model and data ready in {time.perf_counter() - started:.1f} s", flush=True)


def lora_parameters(recipe) -> dict[str, int]:
    """Non-embedding parameters that are frozen, and those the adapters add (built on the meta device, as
    `launcher.plan.memory.measure_model` builds the recipe's model)."""
    config = model_config(recipe.model.name_or_path)[0]
    if recipe.task.type == "sequence_classification":
        config.num_labels = recipe.task.head_outputs
    task = task_class(recipe)
    with torch.device("meta"):
        base = task.model_class.from_config(config)
        base_parameters = count_non_embedding_parameters(base)
        model = apply_lora(base, recipe.lora, task.peft_task_type)
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in embedding)
    return {"frozen_non_embedding": frozen, "adapters": count_non_embedding_parameters(model) - base_parameters}


def memory_plan(recipe) -> dict[str, Any]:
    """What `launcher/run.py RECIPE --check` plans for one device, component by component."""
    estimate = estimate_memory(measure_model(recipe), Topology("single", 1), recipe)
    return {"device_bytes": estimate.device_bytes, "total_bytes": estimate.device_total}


def annotate(result_path: Path, benchmark: Benchmark) -> dict[str, Any]:
    """Add the memory plan and, for LoRA, the adjusted FLOP count to each launcher variant of a compare result."""
    result = json.loads(result_path.read_text())
    peak = peak_bf16_flops(result["machine"]["device_name"])
    for variant in result["variants"]:
        if variant["name"] in BASELINES or "summary" not in variant:
            continue
        recipe = load_recipe(result["settings"]["recipe_path"], [*result["settings"]["overrides"],
                                                                  *variant_overrides(variant["name"])])
        plan = memory_plan(recipe)
        kit: dict[str, Any] = {"memory_plan": plan}
        measured = variant["summary"].get("peak_device_memory_bytes", {}).get("median")
        if measured:
            kit["memory_plan_error"] = plan["total_bytes"] / measured - 1
            # The allocator's peak leaves out the CUDA context and cached blocks, which the plan's overhead covers.
            without_overhead = plan["total_bytes"] - plan["device_bytes"].get("runtime overhead", 0)
            kit["memory_plan_error_without_runtime_overhead"] = without_overhead / measured - 1
        if recipe.lora.enabled:
            counts = lora_parameters(recipe)
            adjusted = lora_adjusted_flops_per_s(variant["summary"], counts["frozen_non_embedding"], counts["adapters"])
            kit["lora_flops"] = {
                "convention": "6N counts a weight gradient for every weight (papers' convention); the adjusted count "
                              "drops the frozen weights' (4N_frozen + 6N_trainable + attention)",
                **counts, "model_flops_per_s_6n": variant["summary"]["model_flops_per_s"]["median"],
                "model_flops_per_s_adjusted": adjusted,
                "mfu_6n": variant["summary"].get("mfu", {}).get("median"),
                "mfu_adjusted": model_flops_utilization(adjusted, peak),
            }
        variant["kit"] = kit
    result["kit_note"] = benchmark.note
    if any(v["name"] in BASELINES for v in result["variants"]):
        result["kit_baseline_precision"] = baseline_precision(result)
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def baseline_precision(result: dict[str, Any]) -> str:
    """The precision the tutorial baselines' `TrainingArguments` ask the Trainer for, given this recipe."""
    recipe = load_recipe(result["settings"]["recipe_path"], result["settings"]["overrides"])
    with tempfile.TemporaryDirectory() as folder:
        arguments = training_arguments(recipe, 1, Path(folder))
    return "bf16" if arguments.bf16 else "fp16" if arguments.fp16 else "fp32"


def variant_overrides(name: str) -> tuple[str, ...]:
    return next(v.overrides for v in VARIANTS if v.name == name)


def run_benchmarks(out: Path, work: Path, smoke: bool, deadline: float, only: Optional[list[str]] = None) -> int:
    failures = 0
    for benchmark in benchmarks_for(smoke, work):
        if only and benchmark.name not in only:
            continue
        left = deadline - time.time()
        if not smoke and left < benchmark.needed_seconds:
            print(f"[kit] {benchmark.name}: skipped, {left:.0f} s left of the time guard "
                  f"(needs about {benchmark.needed_seconds} s)", flush=True)
            (out / f"{benchmark.name}.skipped").write_text(f"{left:.0f} s left of the time guard\n")
            continue
        try:
            prepare(benchmark, work, smoke)
            code = compare_main([
                benchmark.recipe, *benchmark.overrides, "--samples", str(benchmark.samples), "--repeats", "1",
                "--warmup-steps", str(benchmark.warmup_steps), "--variants", ",".join(benchmark.variants),
                "--name", benchmark.name, "--results-dir", str(out), "--work-dir", str(work / "runs"),
                "--timeout", str(max(30.0, deadline - time.time())),
            ])
        except Exception:  # noqa: BLE001  one benchmark's failure must not cost the other's results
            (out / f"{benchmark.name}.failed").write_text(traceback.format_exc())
            print(f"[kit] {benchmark.name} failed:\n{traceback.format_exc()}", flush=True)
            code = 1
        failures += code != 0
        if (out / f"{benchmark.name}.json").exists():
            annotate(out / f"{benchmark.name}.json", benchmark)
    return 1 if failures else 0
