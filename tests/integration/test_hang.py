"""A rank that stops responding ends the run with an error naming the step, within the recipe's collective
timeout plus a margin (2 CPU processes over gloo)."""

from __future__ import annotations

import time

import pytest

from recipes import tiny_recipe, write_recipe
from faults import start_ranks, train_records

TIMEOUT_S = 10  # the schema's minimum: a real run would use minutes
MARGIN_S = 15   # process exit, traceback printing, a loaded 2-core CI machine
HANG_AFTER_STEP = 2


@pytest.mark.slow
def test_unresponsive_rank_ends_run_within_collective_timeout(assets, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        assets, tmp_path / "run", training={"collective_timeout_s": TIMEOUT_S}, output={"save_every_steps": 1}))
    ranks = start_ranks("hang", HANG_AFTER_STEP, "1", recipe)
    try:
        deadline = time.monotonic() + 240
        while HANG_AFTER_STEP not in (train_records(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else {}):
            assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].communicate()[0][-3000:]
            time.sleep(0.1)
        hung_at = time.monotonic()
        output, _ = ranks[0].communicate(timeout=TIMEOUT_S + MARGIN_S + 30)
        waited = time.monotonic() - hung_at
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 1, output[-3000:]
    assert f"a collective failed in optimizer step {HANG_AFTER_STEP + 1}" in output, output[-3000:]
    assert "training.collective_timeout_s=10" in output
    assert TIMEOUT_S - 1 <= waited <= TIMEOUT_S + MARGIN_S, f"rank 0 gave up after {waited:.1f} s"
    assert max(train_records(tmp_path / "run")) == HANG_AFTER_STEP
