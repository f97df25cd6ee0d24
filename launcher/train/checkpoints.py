"""Checkpoints that are complete or absent: written to a temporary folder, fsynced, sealed by a manifest
written last, then renamed into place. Only sealed checkpoints are ever resumed from, and old ones are
rotated out only after the new one is committed.

A checkpoint holds Accelerate's `save_state` (model, optimizer, custom objects: the LR scheduler), one
`rng_state_rank<N>.pt` per rank (Python, NumPy, CPU and accelerator generators, NPU included) and
`manifest.json` (training position, run identity, library versions, sha256 of every file). How each engine lays
out the model and optimizer state, and how that state loads on another number of processes, is
`launcher/train/checkpoint_layouts/`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator

from launcher.recipe.schema import Recipe
from launcher.train.optimization import total_optimizer_steps, warmup_steps
from launcher.train.stopping import StoppedOnEveryRank

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
NAME_PATTERN = re.compile(r"^step-(\d{8})$")
RNG_FILE = "rng_state_rank{rank}.pt"
VERSIONED_LIBRARIES = ("launcher", "torch", "transformers", "accelerate", "peft", "deepspeed", "torch_npu")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found, verified or resumed from."""


class CheckpointWriteError(CheckpointError, StoppedOnEveryRank):
    """Some rank failed to write its part of a checkpoint; every rank learnt it in one all-reduce."""


@dataclass
class TrainPosition:
    """Where training stands; saved in every checkpoint so a resume continues mid-epoch exactly."""

    epoch: int = 0
    batches_in_epoch: int = 0
    optimizer_step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class CheckpointCost:
    """What writing or reading one checkpoint cost: seconds on the critical path (collectives, fsync and hashing
    included) and its size on the main process's file system."""

    seconds: float
    bytes: int

    def record(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_seconds": self.seconds, f"{prefix}_bytes": self.bytes,
                f"{prefix}_gb_per_s": self.bytes / 1e9 / self.seconds if self.seconds else None}

    def describe(self) -> str:
        return f"{self.bytes / 1e9:.3f} GB in {self.seconds:.2f} s ({self.bytes / 1e9 / max(self.seconds, 1e-9):.2f} GB/s)"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_tree(folder: Path) -> None:
    """Flush every file and then the folders themselves, so a crash after the rename finds the data on disk."""
    for path in sorted(folder.rglob("*"), reverse=True):
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def capture_rng(device_type: str) -> dict[str, Any]:
    """Every generator dropout and shuffling can draw from in this process. Accelerate's own copy leaves out
    NPUs (torch_npu's `torch.npu`), hence this file."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if device_type != "cpu":
        state[device_type] = getattr(torch, device_type).get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], device_type: str, source: Path) -> None:
    missing = [key for key in ("python", "numpy", "cpu", device_type) if key not in state]
    if missing:
        raise CheckpointError(f"{source}: holds no random state for {', '.join(missing)}; the resumed run would differ")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if device_type != "cpu":
        getattr(torch, device_type).set_rng_state_all(state[device_type])


class Checkpointer:
    """Saves, finds, verifies and loads the checkpoints of one run directory."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, keep_last: int, identity: dict[str, Any]):
        self.accelerator = accelerator
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep_last = keep_last
        self.identity = identity

    def save(self, position: TrainPosition) -> Path:
        """Write one complete checkpoint for `position`; every rank must call it. If any rank fails to write,
        every rank raises `CheckpointWriteError` and the previous checkpoints stay as they were."""
        name = f"step-{position.optimizer_step:08d}"
        final, staging = self.root / name, self.root / f".incomplete-{name}"
        main = self.accelerator.is_main_process
        self.agree(attempt(lambda: self.prepare(staging)) if main else None, name, staging)
        self.agree(attempt(lambda: self.write_state(staging)), name, staging)
        self.agree(attempt(lambda: self.commit(staging, final, position)) if main else None, name, staging)
        return final

    def prepare(self, staging: Path) -> None:
        for stale in self.root.glob(".incomplete-*"):  # left by a run killed mid-save
            shutil.rmtree(stale)
        staging.mkdir(parents=True)

    def write_state(self, staging: Path) -> None:
        self.accelerator.save_state(str(staging))
        rng_path = staging / RNG_FILE.format(rank=self.accelerator.process_index)
        torch.save(capture_rng(self.accelerator.device.type), rng_path)

    def commit(self, staging: Path, final: Path, position: TrainPosition) -> None:
        self.seal(staging, position)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_dir(self.root)
        self.rotate()

    def agree(self, error: Optional[BaseException], name: str, staging: Path) -> None:
        """Every rank learns whether any rank failed (one all-reduce), so no rank waits for a failed peer."""
        failures = torch.tensor(0.0 if error is None else 1.0, device=self.accelerator.device)
        if self.accelerator.reduce(failures, reduction="sum").item() == 0:
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        previous = self.latest()
        reason = describe_write_error(error, self.root) if error else "another rank failed to write its part"
        raise CheckpointWriteError(
            f"writing checkpoint {self.root / name} failed: {reason}. The previous checkpoint "
            f"{'(' + str(previous) + ') is untouched and loadable' if previous else 'does not exist'}"
        ) from error

    def seal(self, staging: Path, position: TrainPosition) -> None:
        files = {str(p.relative_to(staging)): sha256_of(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {
            "position": position.state_dict(),
            "identity": self.identity,
            "versions": library_versions(),
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        fsync_tree(staging)

    def complete(self) -> list[Path]:
        """Sealed checkpoints, oldest first."""
        return sealed_checkpoints(self.root)

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    def rotate(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old)

    def load(self, folder: Path, manifest: dict[str, Any], state: Path, position: TrainPosition, allow_changed: bool) -> None:
        """Restore checkpoint `folder` (its verified `manifest`, its identity checked: `check_identity`) into the
        prepared objects, the random generators and `position`; Accelerate reads model, optimizer and scheduler from
        `state` (the checkpoint itself, or its state resharded for this world size: launcher/train/checkpoint_layouts/)."""
        world = self.accelerator.num_processes
        saved_world = world_size_of(manifest, world)
        self.accelerator.load_state(str(state))
        self.load_rng(folder, allow_changed or saved_world != world)
        position_state = dict(manifest["position"])
        if saved_world != world:
            position_state["batches_in_epoch"] = rebatched(position_state["batches_in_epoch"], saved_world, world, folder)
        position.load_state_dict(position_state)

    def load_rng(self, folder: Path, allow_changed: bool) -> None:
        """This rank's generators, strictly: Accelerate only logs an INFO line when it cannot restore them."""
        path = folder / RNG_FILE.format(rank=self.accelerator.process_index)
        if not path.is_file():
            if not allow_changed:
                raise CheckpointError(f"{path}: missing; without it this rank's dropout and shuffling would differ")
            warnings.warn(f"{path} is missing (changed world size?); this rank keeps its freshly seeded generators")
            return
        restore_rng(torch.load(path, weights_only=False), self.accelerator.device.type, path)


def run_identity(recipe: Recipe, world_size: int, train_examples: int) -> dict[str, Any]:
    """What makes two runs the same run, as every checkpoint's manifest records it."""
    training = recipe.training
    total_steps = total_optimizer_steps(train_examples, training, world_size)
    return {
        "world_size": world_size,
        "global_batch": training.per_device_batch_size * training.gradient_accumulation_steps * world_size,
        "total_steps": total_steps,
        "warmup_steps": warmup_steps(training, total_steps),
        "scheduler": training.scheduler,
        "lr": training.lr,
        "train_examples": train_examples,
        "seed": training.seed,
    }


def world_size_of(manifest: dict[str, Any], default: int) -> int:
    """How many processes wrote the checkpoint of `manifest`; `default` where a manifest does not say."""
    return manifest["identity"].get("world_size", default)


def check_identity(folder: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse a resume that would quietly be a different run (other global batch or schedule). The world size
    may change (launcher/train/elastic.py): at the same global batch, each step holds the same examples."""
    saved = manifest["identity"]
    changed = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v and k != "world_size"}
    if changed:
        lines = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changed.items()))
        raise CheckpointError(
            f"{folder} was written by a different run setup ({lines}); "
            "resume with the same settings, or set output.allow_changed_resume=true to accept the change"
        )


def rebatched(batches_in_epoch: int, saved_world: int, world: int, folder: Path) -> int:
    """A rank's micro-batches into the epoch on `world` processes for a checkpoint taken `batches_in_epoch` of
    them into it on `saved_world`: the same number of global batches (batch b x W + r is rank r's b-th)."""
    global_batches = batches_in_epoch * saved_world
    if global_batches % world:
        raise CheckpointError(f"{folder}: taken {global_batches} global batches into the epoch, which {world} "
                              "process(es) cannot share evenly")
    return global_batches // world


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of `folder`, after checking every file it lists is present and unchanged."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}; it is not a complete checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err}); the checkpoint is corrupted") from err
    for relative, digest in manifest["files"].items():
        path = folder / relative
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if sha256_of(path) != digest:
            raise CheckpointError(f"{path}: contents differ from the manifest (truncated or corrupted)")
    return manifest


def verify_or_advise(folder: Path) -> dict[str, Any]:
    """`verify`; when `folder` fails its check, the error also names the way back (`fallback_advice`)."""
    try:
        return verify(folder)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. {fallback_advice(folder)}") from err


def fallback_advice(broken: Path) -> str:
    """The newest sealed checkpoint older than `broken`, beside it, that passes its check, and the override
    that resumes from it."""
    for older in reversed([p for p in sealed_checkpoints(broken.parent) if p.name < broken.name]):
        try:
            verify(older)
        except CheckpointError:
            continue
        return f"The newest older checkpoint that passes its check is {older}: resume from it with output.resume_from={older}"
    return f"No older checkpoint in {broken.parent} passes its check: start again without output.resume_from"


def sealed_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders in `root` that hold a manifest, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if NAME_PATTERN.match(p.name) and (p / MANIFEST).is_file()), key=lambda p: p.name)


def attempt(action: Callable[[], None]) -> Optional[Exception]:
    """Run `action`, returning what it raised: torch.save, safetensors and the OS report a full disk as
    RuntimeError, SafetensorError or OSError, and all of them mean this checkpoint is unusable."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - see the docstring; the caller re-raises as CheckpointError
        return err
    return None


def describe_write_error(error: BaseException, root: Path) -> str:
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    return f"{type(error).__name__}: {error} ({free / 2**20:.1f} MiB free on that file system)"
