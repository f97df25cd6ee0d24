"""Resume on another number of processes: a run killed mid-epoch on 2 processes and resumed on 1 (and the
reverse) is the uninterrupted run, step for step: the same examples in every optimizer step, the same losses and
final weights within the float32 tolerance of support/launching.py (dropout off: generators do not carry over).
Under DDP (torchrun) and under DeepSpeed ZeRO-2 and ZeRO-3, whose partitioned state is converted into DeepSpeed's
universal checkpoint (FSDP2: tests/integration/test_fsdp2.py).

The reference is the uninterrupted 2-process DDP run: ZeRO-2 and ZeRO-3 train the same model within the same
tolerance (tests/integration/test_distributed_runs.py), so a resumed ZeRO run that lost or misplaced optimizer
state (a step of lr 1e-3 moves the weights by about 1e-3) fails against it.

64 examples, global batch 8 (4 per device x 2 processes, or x 2 accumulation on one), 2 epochs = 16 steps,
checkpoints every 3 steps; killed after step 11 (checkpoint at step 9, mid-epoch 2), or after step 5 (step 3).
"""

from __future__ import annotations

import json

import pytest
from accelerate import Accelerator

from faults import run_faulty, train_records
from launching import CPU_DEEPSPEED, TOLERANCE, assert_weights_close
from recipes import tiny_recipe, write_recipe
from launcher.recipe.schema import Recipe
from launcher.train.checkpoints import MANIFEST, CheckpointError, run_identity
from launcher.train.elastic import accumulation_for, plan_resume

STEPS = 16
ENGINES = {
    "ddp": {},  # torchrun, ACCELERATE_USE_CPU
    "zero2": {"config": "accelerate_configs/zero2.yaml", "env": CPU_DEEPSPEED},
    "zero3": {"config": "accelerate_configs/zero3.yaml", "env": CPU_DEEPSPEED},
}
DIRECTIONS = {"2-to-1": (2, 1, 11, 1), "1-to-2": (1, 2, 5, 2)}  # processes, accumulation, kill after step, resumed on


def recipe_file(start_model, folder, accumulation: int):
    recipe = tiny_recipe(start_model, folder / "run", model="start",
                         training={"per_device_batch_size": 4, "gradient_accumulation_steps": accumulation,
                                   "log_sample_fingerprints": True, "seed": 3},
                         output={"save_every_steps": 3, "keep_last": 2})
    return write_recipe(folder / "recipe.yaml", recipe)


def assert_same_run(resumed: dict, expected: dict) -> None:
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert sorted(resumed[step]["sample_fingerprints"]) == sorted(expected[step]["sample_fingerprints"]), step
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=0, abs=TOLERANCE), step
        assert resumed[step]["lr"] == expected[step]["lr"]


@pytest.fixture(scope="module")
def uninterrupted(start_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("elastic_reference")
    done = run_faulty("none", 0, "all", recipe_file(start_model, folder, accumulation=1), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return train_records(folder / "run"), folder / "run" / "model"


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "direction"), [("ddp", "2-to-1"), ("ddp", "1-to-2"), ("zero2", "2-to-1"),
                                                   ("zero2", "1-to-2"), ("zero3", "2-to-1")])
def test_a_run_resumed_on_another_world_size_is_the_same_run(start_model, tmp_path, uninterrupted, engine, direction):
    processes, accumulation, kill_step, resumed_on = DIRECTIONS[direction]
    recipe = recipe_file(start_model, tmp_path, accumulation)
    killed = run_faulty("kill", kill_step, "all", recipe, processes=processes, **ENGINES[engine])
    assert killed.returncode != 0 and max(train_records(tmp_path / "run")) == kill_step, killed.stderr[-3000:]

    resumed = run_faulty("none", 0, "all", recipe, "output.resume_from=auto", processes=resumed_on, **ENGINES[engine])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    plan = resumed.stdout
    wanted = 2 // resumed_on
    assert (f"resume on {resumed_on} process(es), checkpoint written by {processes}: gradient accumulation "
            f"{accumulation} -> {wanted} (per device 4) keeps the global batch 8") in plan, plan[-3000:]
    checkpoint = 9 if kill_step == 11 else 3
    assert f"resumed at optimizer step {checkpoint}" in plan
    if engine != "ddp":
        assert (f"DeepSpeed ZeRO state written by {processes} process(es) loads on {resumed_on} as a universal "
                "checkpoint, converted once in") in plan, plan[-3000:]

    expected_records, expected_model = uninterrupted
    assert_same_run(train_records(tmp_path / "run"), expected_records)
    assert_weights_close(tmp_path / "run" / "model", expected_model)

    if (engine, direction) == ("zero2", "2-to-1"):  # the engine that wrote a checkpoint must read it
        plain = run_faulty("none", 0, "all", recipe, "output.resume_from=auto", processes=1)
        assert plain.returncode == 1
        assert ("holds DeepSpeed ZeRO state partitioned by rank (pytorch_model/), but this run (NO) reads whole "
                "state in one file") in plain.stderr, plain.stderr[-3000:]


def test_a_global_batch_no_accumulation_keeps_is_refused_with_the_numbers():
    assert accumulation_for(8, 4, 1) == 2 and accumulation_for(8, 4, 2) == 1
    with pytest.raises(CheckpointError, match="global batch 8 cannot be kept on 3 process"):
        accumulation_for(8, 4, 3)
    with pytest.raises(CheckpointError, match="global batch 8 cannot be kept on 4 process"):
        accumulation_for(8, 4, 4)


def test_per_rank_state_on_another_world_size_is_refused_before_anything_loads(start_model, tmp_path):
    """FSDP's LOCAL_STATE_DICT writes one file per rank: no layout reshards it, so a resume on 1 process of a
    checkpoint written by 2 is refused by name (at the same world size Accelerate reads it as written)."""
    recipe = Recipe.model_validate(tiny_recipe(start_model, tmp_path / "run", model="start",
                                               training={"per_device_batch_size": 4},
                                               output={"resume_from": str(tmp_path / "step-00000003")}))
    checkpoint = tmp_path / "step-00000003"
    checkpoint.mkdir()
    (checkpoint / "pytorch_model_fsdp_rank0.bin").write_bytes(b"")
    written_by_two = run_identity(recipe.model_copy(update={"training": recipe.training.model_copy(
        update={"gradient_accumulation_steps": 1})}), 2, 64)
    (checkpoint / MANIFEST).write_text(json.dumps({"identity": written_by_two, "files": {}, "position": {}}))
    plan = plan_resume(recipe, 1)
    assert plan.recipe.training.gradient_accumulation_steps == 2 and plan.layout is None
    with pytest.raises(CheckpointError, match="written by 2 process.es. in none of the layouts this launcher reshards"):
        plan.state_for(Accelerator(cpu=True), run_identity(plan.recipe, 1, 64))
