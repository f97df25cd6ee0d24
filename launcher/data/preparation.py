"""Data prepared once, then reused: by a second run, a requeued or resumed job, every task of a sweep, and every
process of a multi-process run.

The tokenized splits are kept under a cache key of what they depend on: the data source (a local file's or
folder's size and modification time; a hub dataset's name and configuration), the recipe's `data` and `task`
sections (minus what only the loaders read), the tokenizer (its vocabulary and rules, special tokens, chat
template), and the code that tokenizes (launcher/data and launcher/tasks). The key's folder holds datasets'
own Arrow files (`map(cache_file_name=...)`, memory-mapped when read back) and a `ready.json` marker.

Preparation happens before any process group exists, under a file lock in that folder (as axolotl's PR #2707
does), so no rank waits inside a collective bounded by `training.collective_timeout_s` while another tokenizes:
the first process to take the lock prepares, the others wait on the lock and then read the files. With the
folder on a file system every node sees this is once per job; on node-local disks, once per node.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from launcher.recipe.schema import DataSection, Recipe

READY_MARKER = "ready.json"
ROWS_PER_PROCESS = 10_000
"""Below this many rows per process, starting tokenizing processes costs more than it saves."""
LOADER_ONLY_FIELDS = ("num_workers", "num_proc", "cache_dir", "group_by_length")
"""`data` fields that change how prepared splits are read or made, not what they hold."""
CODE_FOLDERS = ("data", "tasks")
"""launcher/ folders whose code decides what a prepared split holds."""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which Slurm and taskset narrow), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_cache_root() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "launcher-prepared"


@dataclass(frozen=True)
class MapPlan:
    """How a split's `map` runs: where its result is kept, and in how many processes."""

    folder: Optional[Path] = None
    """The cache key's folder; None keeps results where datasets puts them (in memory for in-memory data)."""
    num_proc: Optional[int] = None
    """The recipe's `data.num_proc`; None: `usable_cores()`, at most one per ROWS_PER_PROCESS rows."""

    def processes(self, rows: int) -> Optional[int]:
        wanted = self.num_proc or min(usable_cores(), rows // ROWS_PER_PROCESS)
        return wanted if wanted > 1 else None

    def options(self, origin: str, stage: str, rows: int) -> dict[str, Any]:
        """Keyword arguments for `Dataset.map` / `filter`: the split's `stage` of preparation (`tokenized`, `kept`)
        goes to its own file of the key's folder."""
        options: dict[str, Any] = {"num_proc": self.processes(rows)}
        if self.folder is not None:
            split = hashlib.sha256(origin.encode()).hexdigest()[:12]  # origins are paths or hub names: not file names
            options["cache_file_name"] = str(self.folder / f"{stage}-{split}.arrow")
            # The key already says what the result depends on: datasets need not hash the function (and the
            # tokenizer it holds) again to name it.
            options["new_fingerprint"] = hashlib.sha256(f"{self.folder.name}/{stage}/{split}".encode()).hexdigest()[:32]
        return options


@dataclass(frozen=True)
class Preparation:
    """Where one recipe's prepared data lives and whether it was there before this run."""

    key: str
    folder: Path
    hit: bool
    seconds: float

    def note(self) -> str:
        how = "reused (cache hit)" if self.hit else f"prepared in {self.seconds:.1f} s and cached"
        return f"data: {how}; key {self.key}, {self.folder}"


def file_identity(path: Path) -> list[Any]:
    """A local file's or folder's identity for the key: each file's path, size and modification time."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()]


def source_identity(data: DataSection) -> list[Any]:
    paths = [p for p in (data.train_file, data.eval_file) if p] or ([data.dataset] if Path(data.dataset).exists() else [])
    if paths:
        return [file_identity(Path(p)) for p in paths]
    return [data.dataset, data.dataset_config]  # a hub dataset: datasets' own cache pins the version it downloaded


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    if tokenizer.is_fast:
        # Each call sets the backend's truncation and padding to that call's arguments: not part of the identity.
        rules = {k: v for k, v in json.loads(tokenizer.backend_tokenizer.to_str()).items() if k not in ("truncation", "padding")}
        backend = json.dumps(rules, sort_keys=True)
    else:
        backend = repr(sorted(tokenizer.get_vocab().items()))
    settings = {"special": tokenizer.special_tokens_map, "chat_template": tokenizer.chat_template,
                "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
                "class": type(tokenizer).__name__}
    return hashlib.sha256((backend + json.dumps(settings, sort_keys=True, default=str)).encode()).hexdigest()


def code_identity() -> str:
    launcher = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in CODE_FOLDERS:
        for path in sorted((launcher / folder).rglob("*.py")):
            digest.update(path.relative_to(launcher).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def cache_key(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> str:
    """What the prepared splits depend on, hashed."""
    data = recipe.data.model_dump(mode="json", exclude=set(LOADER_ONLY_FIELDS))
    inputs = {"source": source_identity(recipe.data), "data": data, "task": recipe.task.model_dump(mode="json"),
              "tokenizer": tokenizer_identity(tokenizer), "code": code_identity()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepared_once(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, prepare: Callable[[MapPlan], Any]) -> tuple[Any, Preparation]:
    """`prepare(plan)` under the cache key's lock: the first process to get here writes the key's files and the
    ready marker, every later one (this run's other ranks, the next run) reads them back."""
    key = cache_key(recipe, tokenizer)
    folder = Path(recipe.data.cache_dir or default_cache_root()) / key
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with FileLock(str(folder / "lock")):  # no timeout: whoever holds it is preparing, however long that takes
        hit = (folder / READY_MARKER).is_file()
        result = prepare(MapPlan(folder, recipe.data.num_proc))
        if not hit:
            marker = {"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recipe_data": recipe.data.model_dump(mode="json")}
            (folder / READY_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return result, Preparation(key, folder, hit, time.perf_counter() - started)
