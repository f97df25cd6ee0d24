"""A Slurm submission: what the user asked for (`Request`), validated into the batch job and its per-task recipes
(`plan`), then written next to the outputs and handed to sbatch (`submit`). `launcher/submit.py` is its command line.

Every recipe (each sweep task's too) is validated before anything is rendered, and the cluster is asked whether
it can hold the job before anything is written.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.cluster.slurm import SLURM_FILES, BatchJob, Resources, SlurmError, check_cluster, sbatch
from launcher.cluster.sweeps import SweepTask, expand, write_manifest
from launcher.recipe.loading import RecipeError, load_recipe
from launcher.recipe.schema import Recipe
from launcher.train.run_directory import check_run_directory, recipe_yaml

DEFAULT_ACCELERATE_CONFIG = {"gpu": "accelerate_configs/multi_node.yaml", "npu": "accelerate_configs/npu_ddp.yaml",
                             "cpu": "accelerate_configs/multi_node.yaml"}  # CPU processes: torchrun, gloo
RUN_SCRIPT = Path(__file__).resolve().parents[1] / "run.py"
PREPARE_SCRIPT = Path(__file__).resolve().parents[1] / "prepare.py"
FROZEN_RECIPE = "recipe.yaml"


@dataclass(frozen=True)
class Request:
    """What the user asked for: the recipe and its overrides, the resources, a sweep, and how to launch."""

    recipe: str
    overrides: list[str]
    resources: Resources
    array: list[str] = field(default_factory=list)
    """`section.key=v1,v2` specs; their cartesian product makes the tasks of a job array."""
    max_running: Optional[int] = None
    job_name: Optional[str] = None
    accelerate_config: Optional[Path] = None
    """The topology's accelerate config; None: DEFAULT_ACCELERATE_CONFIG for the device (none for one CPU process)."""
    signal_seconds: int = 300
    env: dict[str, str] = field(default_factory=dict)
    prepare: bool = False
    """Prepare the data as the job's first step, so the training processes only read it back."""


@dataclass
class Submission:
    """The validated job: its script inputs, and one recipe and run directory per task."""

    job: BatchJob
    root: Path
    tasks: list[SweepTask]
    recipes: list[Recipe]
    run_dirs: list[Path]

    @property
    def script_path(self) -> Path:
        return self.root / SLURM_FILES / "job.sbatch"


def load_task_recipes(request: Request, tasks: list[SweepTask], root: str) -> list[Recipe]:
    """Each task's recipe, output dir included; every task's problems are gathered into one error."""
    recipes, problems = [], []
    for task in tasks:
        # JSON quoting keeps the folder a YAML string whatever the swept values look like.
        output_dir = "output.dir=" + json.dumps(str(Path(root) / task.slug))
        try:
            recipes.append(load_recipe(request.recipe, [*request.overrides, *task.overrides, output_dir]))
        except RecipeError as err:
            problems += [f"array task {task.index} ({' '.join(task.overrides)}): {p}" for p in err.problems]
    if problems:
        raise RecipeError(request.recipe, problems)
    return recipes


def accelerate_config(request: Request) -> Optional[Path]:
    resources = request.resources
    default = None if resources.single_cpu_process else Path(DEFAULT_ACCELERATE_CONFIG[resources.device])
    path = request.accelerate_config or default
    if path is not None and not path.is_file():
        raise SlurmError(f"accelerate config {path} not found: pass --accelerate-config PATH")
    return path.resolve() if path is not None else None


def plan(request: Request) -> Submission:
    """Validate everything that can be checked without the cluster and assemble the job."""
    base = load_recipe(request.recipe, request.overrides)
    tasks = expand(request.array) if request.array else []
    recipes = load_task_recipes(request, tasks, base.output.dir) if tasks else [base]
    for recipe in recipes:
        check_run_directory(recipe)
    root = Path(base.output.dir).resolve()
    run_dirs = [Path(recipe.output.dir).resolve() for recipe in recipes]
    job = BatchJob(
        name=request.job_name or Path(request.recipe).stem,
        resources=request.resources,
        run_recipes=[run_dir / SLURM_FILES / FROZEN_RECIPE for run_dir in run_dirs],
        array=bool(tasks),
        log_dir=root / SLURM_FILES / "logs",
        workdir=Path.cwd(),
        python=sys.executable,
        run_script=RUN_SCRIPT,
        accelerate_config=accelerate_config(request),
        signal_seconds=request.signal_seconds,
        collective_timeout_s=max(recipe.training.collective_timeout_s for recipe in recipes),
        max_running=request.max_running,
        env=request.env,
        prepare_script=PREPARE_SCRIPT if request.prepare else None,
    )
    return Submission(job, root, tasks, recipes, run_dirs)


def write_files(submission: Submission, script: str) -> None:
    """The script, the log folder, each task's frozen recipe and a sweep's task list, next to the outputs."""
    submission.job.log_dir.mkdir(parents=True, exist_ok=True)
    submission.script_path.write_text(script, encoding="utf-8")
    for recipe, path in zip(submission.recipes, submission.job.run_recipes):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(recipe_yaml(recipe), encoding="utf-8")
    if submission.tasks:
        write_manifest(submission.root, submission.tasks, submission.run_dirs)


def submit(submission: Submission, script: str) -> tuple[str, str]:
    """Write the job's files and submit it; returns the partition it went to and the job id."""
    partition = check_cluster(submission.job.resources)
    write_files(submission, script)
    return partition, sbatch(submission.script_path)
