"""The project's lock: the exact versions of every package the test suite last passed with.

    python scripts/lock.py write [--python .venv/bin/python]   # the venv's versions become requirements-lock.txt
    python scripts/lock.py diff  [--python .venv-canary/bin/python]   # what moved between the lock and a venv

`scripts/setup.sh` installs with `pip install -c requirements-lock.txt` (a constraints file: it pins versions
without adding packages), so the README's commands install what was tested; `LATEST=1` skips it. torch and its
CUDA companions are left out: the build depends on the machine (`TORCH_SPEC` in setup.sh), and a GPU user's CUDA
torch must not be downgraded to the CPU wheel. The launcher itself is left out (it is installed from the tree).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements-lock.txt"
MACHINE_DEPENDENT = ("torch", "triton", "nvidia-")
NOT_LOCKED = {"launcher", "pip", "setuptools", "wheel"}


def normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed(python: str) -> dict[str, str]:
    """Every distribution in the venv of `python`, by normalized name."""
    listing = subprocess.run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                             check=True, capture_output=True, text=True).stdout
    return {normalized(entry["name"]): entry["version"] for entry in json.loads(listing)}


def lockable(name: str) -> bool:
    return name not in NOT_LOCKED and not name.startswith(MACHINE_DEPENDENT)


def read_lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalized(name)] = version
    return pins


def write(python: str) -> None:
    versions = installed(python)
    torch = versions.get("torch", "not installed")
    header = [
        f"# Written by `python scripts/lock.py write` on {date.today()} from a venv whose test suite passed",
        f"# (Python {platform.python_version()}, {platform.system()} {platform.machine()}, torch {torch} not locked).",
        "# Refresh: README, \"Installing: the lock, LATEST=1 and the upstream canary\".",
    ]
    pins = [f"{name}=={version}" for name, version in sorted(versions.items()) if lockable(name)]
    LOCK.write_text("\n".join(header + pins) + "\n")
    print(f"{LOCK.name}: {len(pins)} packages")


def diff(python: str) -> int:
    """Print each package whose version differs from the lock; return how many moved."""
    locked, now = read_lock(), {name: v for name, v in installed(python).items() if lockable(name)}
    moved = [f"  {name}: {locked[name]} -> {now[name]}" for name in sorted(locked.keys() & now.keys())
             if locked[name] != now[name]]
    added = [f"  {name}: new, {now[name]}" for name in sorted(now.keys() - locked.keys())]
    gone = [f"  {name}: {locked[name]}, no longer installed" for name in sorted(locked.keys() - now.keys())]
    changes = moved + added + gone
    print(f"packages that differ from {LOCK.name}: {len(changes)}")
    for change in changes:
        print(change)
    return len(changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["write", "diff"])
    parser.add_argument("--python", default=sys.executable, help="the venv's interpreter (default: this one)")
    args = parser.parse_args()
    if args.command == "write":
        write(args.python)
    else:
        diff(args.python)


if __name__ == "__main__":
    main()
