"""`training.reuse_host_memory`: freed large blocks stay in the process for the next step instead of going
back to the OS (and being page-faulted in again)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from recipes import tiny_recipe, write_recipe
from runs import run_cli
from launcher.train.reporting import read_metrics_log

# Allocate and free a gradient-sized block; print how much of it the process still holds (statm, pages).
FREE_AND_MEASURE = """
import os, sys, torch
from launcher.distributed.host_memory import keep_freed_host_memory
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


def test_the_allocator_setting_changes_the_speed_not_the_numbers(assets, tmp_path):
    kept = ("freed blocks up to 1024 MiB are kept for reuse" if platform.libc_ver()[0] == "glibc"
            else "left to the system allocator")
    plan_line = {"true": kept, "false": "host memory: system allocator defaults"}
    losses = {}
    for reuse, expected in plan_line.items():
        out = tmp_path / f"reuse-{reuse}"
        recipe = write_recipe(tmp_path / f"{reuse}.yaml", tiny_recipe(assets, out))
        done = run_cli(str(recipe), "training.max_steps=3", f"training.reuse_host_memory={reuse}")
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout  # the run plan says how this run's host memory is handled
        losses[reuse] = [r["loss"] for r in read_metrics_log(out) if r["kind"] == "train"]
    assert len(losses["true"]) == 3 and losses["true"] == losses["false"]
