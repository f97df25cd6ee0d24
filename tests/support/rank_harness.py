"""`launcher/run.py` that also records where each rank ran and which stop signals reached it, for the multi-node
Slurm tests (they point `launcher.submit` at this file instead of run.py):

    python tests/support/rank_harness.py RECIPE [overrides...]

Each rank writes OUTPUT_DIR/ranks/restart-R-rank-N.json ({"rank", "node", "pid", "parent", "signals"}) when it
starts and again whenever its stop handler runs. Nothing in the run is changed: the handler is the launcher's
own, wrapped to record its signal. With HARNESS_SIGUSR1_AFTER_STEP=N in the environment (`submit --env`), every
rank sends itself SIGUSR1 after optimizer step N (faults.py's `sigusr1`): a preemption at an exact step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from faults import patches  # noqa: E402
from launcher.train import stopping  # noqa: E402
from launcher.recipe.loading import load_recipe  # noqa: E402
from launcher.run import main  # noqa: E402


def rank_file(output_dir: str) -> Path:
    name = f"restart-{os.environ.get('SLURM_RESTART_COUNT', '0')}-rank-{os.environ.get('RANK', '0')}.json"
    return Path(output_dir) / "ranks" / name


def read_ranks(output_dir: Path, restart: int) -> list[dict]:
    """The records of every rank of run number `restart` (0 = the first), by rank."""
    records = [json.loads(path.read_text()) for path in (output_dir / "ranks").glob(f"restart-{restart}-rank-*.json")]
    return sorted(records, key=lambda record: record["rank"])


def install(output_dir: str) -> None:
    record = {"rank": int(os.environ.get("RANK", "0")), "node": os.environ.get("SLURMD_NODENAME"),
              "pid": os.getpid(), "parent": os.getppid(), "signals": []}
    path = rank_file(output_dir)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(record))
        path.with_suffix(".tmp").replace(path)

    handle = stopping.StopRequest.handle

    def recording_handle(self, signum, frame):
        handle(self, signum, frame)
        record["signals"].append(self.received[-1])
        write()

    stopping.StopRequest.handle = recording_handle
    write()


if __name__ == "__main__":
    install(load_recipe(sys.argv[1], sys.argv[2:]).output.dir)
    if "HARNESS_SIGUSR1_AFTER_STEP" in os.environ:
        for owner, name, replacement in patches("sigusr1", int(os.environ["HARNESS_SIGUSR1_AFTER_STEP"])):
            setattr(owner, name, replacement)
    sys.exit(main(sys.argv[1:]))
