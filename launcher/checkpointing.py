"""Checkpoints that are complete or absent: written to a temporary folder, fsynced, sealed by a manifest
written last, then renamed into place. Only sealed checkpoints are ever resumed from, and old ones are
rotated out only after the new one is committed.

A checkpoint holds Accelerate's `save_state` (model, optimizer, RNG states of every rank, custom
objects: the training position and the LR scheduler) plus `manifest.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
NAME_PATTERN = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found, verified or resumed from."""


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


class Checkpointer:
    """Saves, finds, verifies and loads the checkpoints of one run directory."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, keep_last: int, identity: dict[str, Any]):
        self.accelerator = accelerator
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep_last = keep_last
        self.identity = identity

    def save(self, position: TrainPosition, extra_manifest: Optional[dict[str, Any]] = None) -> Path:
        """Write one complete checkpoint for `position`; every rank must call it."""
        name = f"step-{position.optimizer_step:08d}"
        final, staging = self.root / name, self.root / f".incomplete-{name}"
        main = self.accelerator.is_main_process
        if main:
            for stale in self.root.glob(".incomplete-*"):  # left by a run killed mid-save
                shutil.rmtree(stale)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(staging))
            self.accelerator.wait_for_everyone()
            if main:
                self.seal(staging, position, extra_manifest or {})
                if final.exists():
                    shutil.rmtree(final)
                os.rename(staging, final)
                fsync_dir(self.root)
                self.rotate()
        except OSError as err:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            previous = self.latest()
            raise CheckpointError(
                f"writing checkpoint {name} failed ({err.strerror or err}); "
                f"the previous checkpoint {'is ' + str(previous) if previous else 'does not exist'} and is untouched"
            ) from err
        self.accelerator.wait_for_everyone()
        return final

    def seal(self, staging: Path, position: TrainPosition, extra: dict[str, Any]) -> None:
        files = {str(p.relative_to(staging)): sha256_of(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {"position": position.state_dict(), "identity": self.identity, "files": files, **extra}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        fsync_tree(staging)

    def complete(self) -> list[Path]:
        """Sealed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if NAME_PATTERN.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    def rotate(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old)

    def verify(self, folder: Path) -> dict[str, Any]:
        """The manifest of `folder`, after checking every file it lists is present and unchanged."""
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(f"{folder}: no {MANIFEST}; it is not a complete checkpoint")
        manifest = json.loads(manifest_path.read_text())
        for relative, digest in manifest["files"].items():
            path = folder / relative
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the manifest but missing")
            if sha256_of(path) != digest:
                raise CheckpointError(f"{path}: contents differ from the manifest (truncated or corrupted)")
        return manifest

    def check_identity(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Refuse a resume that would quietly be a different run (other global batch, world size or schedule)."""
        saved = manifest["identity"]
        changed = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
        if changed:
            lines = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changed.items()))
            raise CheckpointError(
                f"{folder} was written by a different run setup ({lines}); "
                "resume with the same settings, or set output.allow_changed_resume=true to accept the change"
            )

    def load(self, folder: Path, position: TrainPosition, allow_changed: bool) -> None:
        """Restore everything `save` wrote into the prepared objects and `position`."""
        manifest = self.verify(folder)
        if not allow_changed:
            self.check_identity(folder, manifest)
        self.accelerator.load_state(str(folder))
        position.load_state_dict(manifest["position"])
