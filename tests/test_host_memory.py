"""`training.reuse_host_memory`: freed large blocks stay in the process for the next step instead of going
back to the OS (and being page-faulted in again)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from conftest import run_cli, tiny_recipe, write_recipe

# Allocate and free a gradient-sized block; print how much of it the process still holds (statm, pages).
FREE_AND_MEASURE = """
import os, sys, torch
from launcher.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    print(keep_freed_host_memory(), file=sys.stderr)
page = os.sysconf("SC_PAGE_SIZE")
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before = resident()
block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
del block
print((resident() - before) >> 20)
"""


def still_resident_mib(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FREE_AND_MEASURE, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_freed_blocks_stay_in_the_process_only_when_asked():
    assert still_resident_mib("system") < 8  # glibc munmaps a block this large on free
    assert still_resident_mib("keep") >= 60  # kept in the heap for the next allocation


def test_the_run_plan_says_how_host_memory_is_handled(assets, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(assets, tmp_path / "run"))
    kept = run_cli(str(recipe), "training.max_steps=1")
    assert kept.returncode == 0, kept.stderr
    expected = ("freed blocks up to 1024 MiB are kept for reuse" if platform.libc_ver()[0] == "glibc"
                else "left to the system allocator")
    assert expected in kept.stdout
    system = run_cli(str(recipe), "training.max_steps=1", "training.reuse_host_memory=false", "output.overwrite=true")
    assert system.returncode == 0, system.stderr
    assert "host memory: system allocator defaults" in system.stdout
