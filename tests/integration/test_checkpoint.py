"""Checkpoints: atomic (never an incomplete one as latest, rotation after commit), verified (a corrupted or
truncated file fails naming it), complete (a missing piece is a hard error, NPU random state included),
refused when the run setup changed, and a full disk leaves the previous one loadable."""

from __future__ import annotations

import json
import random
import re
import subprocess
import types

import numpy as np
import pytest
import torch

from recipes import tiny_recipe, write_recipe
from runs import run_in_process
from faults import patches, run_faulty, train_records
from launcher.train.checkpoints import MANIFEST, CheckpointError, capture_rng, restore_rng
from launcher.train.stopping import EXIT_STOPPED_FOR_RESUME


def recipe_at(assets, folder, **output):
    recipe = tiny_recipe(assets, folder / "run", output={"save_every_steps": 3, **output})
    return write_recipe(folder / "recipe.yaml", recipe)


def stop_after(monkeypatch, step: int, recipe, *overrides) -> int:
    """Run in process until a SIGUSR1 at `step` makes it checkpoint and exit."""
    with monkeypatch.context() as patched:
        for owner, name, replacement in patches("sigusr1", step):
            patched.setattr(owner, name, replacement)
        return run_in_process(recipe, *overrides)


@pytest.fixture
def stopped_run(assets, tmp_path, monkeypatch, restore_signal_handlers):
    """A run stopped at step 4: checkpoints step-3 and step-4 on disk."""
    recipe = recipe_at(assets, tmp_path)
    assert stop_after(monkeypatch, 4, recipe) == EXIT_STOPPED_FOR_RESUME
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003", "step-00000004"]
    return recipe, checkpoints


@pytest.mark.slow
def test_kill_during_save_never_leaves_an_incomplete_latest(assets, tmp_path):
    recipe = recipe_at(assets, tmp_path, keep_last=1)
    killed = run_faulty("kill_saving", 6, "0", recipe)
    assert killed.returncode == -9
    checkpoints = tmp_path / "run" / "checkpoints"
    # Killed after the manifest was written but before the rename: the staging folder looks complete inside,
    # and step-3 survives although keep_last=1 (rotation only follows a commit).
    assert (checkpoints / ".incomplete-step-00000006" / MANIFEST).is_file()
    assert sorted(p.name for p in checkpoints.iterdir()) == [".incomplete-step-00000006", "step-00000003"]

    assert run_in_process(recipe, "output.resume_from=auto") == 0
    log = [r["step"] for r in json_lines(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert log[:6] == [1, 2, 3, 4, 5, 6] and log[6] == 4, "resumed from step-3, not from the incomplete step-6"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000016"]


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file_name, damage", [
    ("model.safetensors", truncate),
    ("optimizer.bin", flip_byte),
    ("rng_state_rank0.pt", truncate),
    ("custom_checkpoint_0.pkl", flip_byte),
    (MANIFEST, truncate),
])
def test_damaged_checkpoint_fails_naming_the_file(stopped_run, capsys, file_name, damage):
    recipe, checkpoints = stopped_run
    damage(checkpoints / "step-00000004" / file_name)
    assert run_in_process(recipe, "output.resume_from=auto") == 1
    error = capsys.readouterr().err
    assert f"step-00000004/{file_name}" in error and ("corrupted" in error or "truncated" in error), error
    older = checkpoints / "step-00000003"
    assert f"The newest older checkpoint that passes its check is {older}: resume from it with output.resume_from={older}\n" in error


def test_the_advised_older_checkpoint_resumes(stopped_run, capsys):
    recipe, checkpoints = stopped_run
    flip_byte(checkpoints / "step-00000004" / "model.safetensors")
    assert run_in_process(recipe, "output.resume_from=auto") == 1
    advised = capsys.readouterr().err.rsplit("resume from it with ", 1)[1].strip()
    assert advised == f"output.resume_from={checkpoints / 'step-00000003'}"
    assert run_in_process(recipe, advised) == 0
    assert "resumed at optimizer step 3" in capsys.readouterr().out


def test_no_older_checkpoint_passing_its_check_is_said(stopped_run, capsys):
    recipe, checkpoints = stopped_run
    for name in ("step-00000003", "step-00000004"):
        flip_byte(checkpoints / name / "optimizer.bin")
    assert run_in_process(recipe, "output.resume_from=auto") == 1
    assert f"No older checkpoint in {checkpoints} passes its check: start again without output.resume_from" in capsys.readouterr().err


def test_missing_random_state_is_a_hard_error(stopped_run, capsys):
    """A checkpoint without this rank's random state (Accelerate alone would log INFO and go on) is refused."""
    recipe, checkpoints = stopped_run
    folder = checkpoints / "step-00000004"
    (folder / "rng_state_rank0.pt").unlink()
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["files"]["rng_state_rank0.pt"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert run_in_process(recipe, "output.resume_from=auto") == 1
    assert "step-00000004/rng_state_rank0.pt: missing" in capsys.readouterr().err


@pytest.mark.parametrize("override, changed", [
    ("training.per_device_batch_size=4", "global_batch: 8 -> 4"),
    ("training.epochs=3", "total_steps: 16 -> 24"),
    ("training.scheduler=cosine", "scheduler: linear -> cosine"),
])
def test_resume_with_changed_setup_is_refused(stopped_run, capsys, override, changed):
    recipe, _ = stopped_run
    assert run_in_process(recipe, "output.resume_from=auto", override) == 1
    error = capsys.readouterr().err
    assert changed in error and "output.allow_changed_resume=true" in error, error


def test_resume_with_changed_setup_runs_when_allowed(stopped_run, capsys):
    recipe, _ = stopped_run
    assert run_in_process(recipe, "output.resume_from=auto", "training.scheduler=cosine", "output.allow_changed_resume=true") == 0
    assert "resumed at optimizer step 4" in capsys.readouterr().out


def test_resume_auto_picks_latest_complete_checkpoint(stopped_run, capsys):
    recipe, checkpoints = stopped_run
    (checkpoints / "step-00000004" / MANIFEST).unlink()  # unsealed: as if killed before the manifest
    assert run_in_process(recipe, "output.resume_from=auto") == 0
    assert "resumed at optimizer step 3" in capsys.readouterr().out


class SimulatedNpu(types.SimpleNamespace):
    """torch_npu's RNG API (`torch.npu.get_rng_state_all` / `set_rng_state_all`) over real CPU generators, one
    per simulated device: there is no NPU here, and this is the only part of torch.npu the checkpoint touches."""

    def __init__(self, devices: int):
        super().__init__(generators=[torch.Generator().manual_seed(100 + i) for i in range(devices)])

    def get_rng_state_all(self):
        return [g.get_state() for g in self.generators]

    def set_rng_state_all(self, states):
        for generator, state in zip(self.generators, states):
            generator.set_state(state)


def test_npu_random_state_is_saved_and_restored(monkeypatch, tmp_path):
    npu = SimulatedNpu(devices=2)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    saved = capture_rng("npu")
    expected = [torch.rand(3, generator=g) for g in npu.generators], torch.rand(3), random.random(), np.random.rand()
    for generator in npu.generators:
        torch.rand(5, generator=generator)
    restore_rng(saved, "npu", tmp_path / "rng_state_rank0.pt")
    again = [torch.rand(3, generator=g) for g in npu.generators], torch.rand(3), random.random(), np.random.rand()
    assert all(torch.equal(a, b) for a, b in zip(expected[0], again[0]))
    assert torch.equal(expected[1], again[1]) and expected[2:] == again[2:]


def test_random_state_without_the_device_in_use_is_refused(tmp_path):
    """A CPU checkpoint resumed on an NPU would silently reseed the NPU generators: refused."""
    with pytest.raises(CheckpointError, match="no random state for npu"):
        restore_rng(capture_rng("cpu"), "npu", tmp_path / "rng_state_rank0.pt")


@pytest.fixture
def small_file_system(tmp_path):
    """A real 16 MiB tmpfs (root only, as in CI): ENOSPC comes from the kernel, not from a mock."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_disk_full_during_save_fails_clearly_and_keeps_previous(assets, tmp_path, small_file_system, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(assets, small_file_system / "run", output={"save_every_steps": 3}))
    with monkeypatch.context() as patched:
        for owner, name, replacement in patches("fill_disk", 6):
            patched.setattr(owner, name, replacement)
        assert run_in_process(recipe) == 1
    error = capsys.readouterr().err
    checkpoints = small_file_system / "run" / "checkpoints"
    assert "writing checkpoint" in error and "step-00000006 failed" in error and "No space left on device" in error, error
    assert "step-00000003) is untouched and loadable" in error
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003"], "no half-written folder left behind"

    (small_file_system / "run" / "filler.bin").unlink()
    assert run_in_process(recipe, "output.resume_from=auto") == 0
    assert max(train_records(small_file_system / "run")) == 16


def test_each_save_and_the_resume_read_are_timed_and_sized(stopped_run, capsys):
    """metrics.jsonl and the run summary say what each checkpoint cost: seconds, GB on disk, GB/s."""
    from launcher.train.checkpoints import folder_bytes
    from launcher.train.run_directory import read_run_summary

    recipe, checkpoints = stopped_run
    saves = {r["step"]: r for r in json_lines(checkpoints.parent / "metrics.jsonl") if r["kind"] == "checkpoint"}
    assert sorted(saves) == [3, 4]
    assert saves[4]["save_bytes"] == folder_bytes(checkpoints / "step-00000004") > 0
    assert all(r["save_seconds"] > 0 and r["save_gb_per_s"] == pytest.approx(r["save_bytes"] / 1e9 / r["save_seconds"])
               for r in saves.values())
    capsys.readouterr()
    assert run_in_process(recipe, "output.resume_from=auto") == 0
    assert re.search(r"resumed at optimizer step 4 \(epoch 0, batch 4\); checkpoint read: \d+\.\d{3} GB in \d+\.\d\d s",
                     capsys.readouterr().out)
    summary = read_run_summary(checkpoints.parent)["checkpoints"]
    assert summary["load"]["load_seconds"] > 0 and summary["load"]["load_bytes"] == saves[4]["save_bytes"]
    assert summary["saves"] and all(s["save_bytes"] > 0 for s in summary["saves"])
