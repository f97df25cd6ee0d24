"""The resolved run, printed before training starts and by `--check`: sizes, batch arithmetic, steps,
precision and topology, so a user sees what will happen before paying for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.data.sources import DataError, load_splits
from launcher.distributed.accelerator import nonfinite_policy_problem
from launcher.distributed.devices import DeviceInfo, precision_note, supports
from launcher.model.loading import ModelError, check_lora_architecture, check_max_length, load_tokenizer
from launcher.plan.memory import MemoryPlanError, Topology, describe_memory, estimate_memory, fits, measure_model
from launcher.recipe.schema import Recipe
from launcher.tasks import prepare_task_once, task_class
from launcher.tasks.sequence_classification.packing import check_packing
from launcher.train.optimization import steps_per_epoch, total_optimizer_steps, warmup_steps


@dataclass
class RunPlan:
    recipe: Recipe
    world_size: int
    device: str
    distributed: str
    precision: str
    train_examples: Optional[int]
    eval_examples: Optional[int]
    notes: list[str] = field(default_factory=list)
    memory: list[str] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        t = self.recipe.training
        return t.per_device_batch_size * t.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> Optional[int]:
        if self.train_examples is None:
            return None
        return steps_per_epoch(self.train_examples, self.recipe.training, self.world_size)

    @property
    def total_steps(self) -> Optional[int]:
        if self.train_examples is None:
            return self.recipe.training.max_steps
        return total_optimizer_steps(self.train_examples, self.recipe.training, self.world_size)

    def describe(self) -> str:
        r, t = self.recipe, self.recipe.training
        unknown = "unknown until the data loads"
        total = self.total_steps
        lora = f"LoRA r={r.lora.r} alpha={r.lora.alpha}" if r.lora.enabled else "full fine-tune"
        rows = [
            ("model", f"{r.model.name_or_path} ({lora}, weights in {r.model.load_dtype})"),
            ("task", f"{task_class(r).describe(r)}, metrics {', '.join(['loss', *r.metric_names])}"),
            ("data", f"train {self.train_examples or unknown} / eval {self.eval_examples if self.eval_examples is not None else 'none'}"
                     f", max_length {r.data.max_length}, padding {r.data.padding}"),
            ("global batch", f"{self.global_batch} = {t.per_device_batch_size} per device x {t.gradient_accumulation_steps} "
                             f"accumulation x {self.world_size} process(es)"),
            ("steps", f"{self.steps_per_epoch or unknown} per epoch, {total or unknown} in total"
                      f" ({t.epochs} epochs)" if not t.max_steps else f"{total} (max_steps)"),
            ("schedule", f"AdamW lr {t.lr:g}, {t.scheduler}, warmup {warmup_steps(t, total) if total else unknown} steps, "
                         f"clip {t.max_grad_norm}"),
            ("precision", self.precision),
            ("topology", f"{self.world_size} x {self.device} ({self.distributed})"),
            ("output", r.output.dir + (f" (resume_from={r.output.resume_from})" if r.output.resume_from else "")),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.rjust(width)} : {v}" for k, v in rows]
        lines += [f"{'memory'.rjust(width)} : {m}" for m in self.memory]
        lines += [f"{'note'.rjust(width)} : {n}" for n in self.notes]
        return "\n".join(lines)


def check_recipe(recipe: Recipe, topology: Topology, device: DeviceInfo) -> tuple[RunPlan, list[str]]:
    """Everything that can be checked without weights or a process group: data (local files must load),
    labels, LoRA targets, precision support, per-device memory on the topology. Returns the plan and the
    problems that make the recipe fail (an estimate over the given device memory is one)."""
    problems: list[str] = check_lora_architecture(recipe) + check_packing(recipe)
    if topology.strategy == "deepspeed":
        problems += filter(None, [nonfinite_policy_problem(recipe.training)])
    plan = RunPlan(recipe, topology.processes, device.type, topology.describe(), recipe.training.precision, None, None)
    problems += plan_memory(plan, topology)
    problems += check_model_source(recipe.model.name_or_path)
    try:
        check_data(recipe, plan)
    except ModelError as err:
        problems.append(str(err))
    except DataError as err:
        if recipe.data.train_file is not None:
            problems.append(str(err))
        else:
            plan.notes.append(f"data not verified here: {str(err).split('. Offline?')[0]}")
            plan.train_examples = recipe.data.train_samples
            plan.eval_examples = recipe.data.eval_samples
    if not supports(device, recipe.training.precision):
        plan.notes.append(f"{recipe.training.precision} is not supported on this machine's {device.type}; "
                          "it runs where it is (e.g. the GPU nodes)")
    plan.notes += filter(None, [precision_note(device, recipe.training.precision)])
    return plan, problems


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id: absolute, relative to here or home, or under a folder that exists here."""
    return name_or_path.startswith(("/", ".", "~")) or Path(name_or_path.split("/")[0]).is_dir()


def check_model_source(name_or_path: str) -> list[str]:
    """A local model folder must exist and hold a config.json (a hub id is checked where the hub is reachable)."""
    if not looks_local(name_or_path):
        return []
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return [f"model.name_or_path: {folder} is not a folder (relative paths are taken from {Path.cwd()})"]
    if not (folder / "config.json").is_file():
        return [f"model.name_or_path: {folder} holds no config.json; it is not a saved model"]
    return []


def check_data(recipe: Recipe, plan: RunPlan) -> None:
    """Load the data and, when the tokenizer is at hand, prepare it exactly as the run will (labels, rendering,
    truncation), into the preparation cache the run then reads; what the task found goes into the plan."""
    try:
        tokenizer = load_tokenizer(recipe.model)
    except (OSError, ValueError) as err:
        splits = load_splits(recipe.data, task_class(recipe).columns(recipe))
        plan.notes.append(f"rows not tokenized here: tokenizer not loadable ({str(err).splitlines()[0][:120]})")
    else:
        check_max_length(recipe, tokenizer)
        prepared, preparation = prepare_task_once(recipe, tokenizer)
        splits = prepared.data
        plan.notes += [preparation.note(), *prepared.notes]
    plan.train_examples = len(splits.train)
    plan.eval_examples = len(splits.eval) if splits.eval is not None else None


def plan_memory(plan: RunPlan, topology: Topology) -> list[str]:
    """Fill the plan's memory rows; a model whose config cannot be read is a note, not a failure."""
    try:
        size = measure_model(plan.recipe)
    except MemoryPlanError as err:
        plan.notes.append(f"memory not estimated: {err}")
        return []
    estimate = estimate_memory(size, topology, plan.recipe)
    plan.memory = describe_memory(size, topology, estimate)
    if fits(topology, estimate):
        return []
    return [f"estimated {estimate.device_total / 2**30:.1f} GiB per device exceeds {topology.device_memory_gib:g} GiB "
            "(see the memory rows; more processes, ZeRO-3, offload, LoRA or gradient checkpointing reduce it)"]
