"""Mid-epoch resume continues the data order exactly: no example repeated or skipped, inside an epoch and
across an epoch boundary. Each example's text encodes its index; the training log's per-step sample
fingerprints (training.log_sample_fingerprints) say which examples every step really fed to the model."""

from __future__ import annotations

import zlib

import numpy as np
from transformers import AutoTokenizer

from builders import WORDS, write_csv
from recipes import tiny_recipe, write_recipe
from runs import run_in_process
from faults import patches, train_records
from launcher.train.reporting import read_metrics_log
from launcher.train.stopping import EXIT_STOPPED_FOR_RESUME

EXAMPLES, BATCH, EPOCHS = 64, 8, 2
STEPS_PER_EPOCH = EXAMPLES // BATCH


def indexed_rows() -> list[dict]:
    """Example i reads as two vocabulary words spelling i in base len(WORDS): unique token ids per example."""
    return [{"text": f"{WORDS[i // len(WORDS)]} {WORDS[i % len(WORDS)]}", "label": i % 2} for i in range(EXAMPLES)]


def example_index(assets) -> dict[int, int]:
    tokenizer = AutoTokenizer.from_pretrained(assets["bert"])
    ids = tokenizer([r["text"] for r in indexed_rows()], truncation=True, max_length=64)["input_ids"]
    index = {zlib.crc32(np.asarray(row, dtype=np.int64).tobytes()): i for i, row in enumerate(ids)}
    assert len(index) == EXAMPLES
    return index


def examples_by_step(run_dir, index) -> list[list[int]]:
    records = train_records(run_dir)
    return [[index[f] for f in records[step]["sample_fingerprints"]] for step in sorted(records)]


def test_stop_mid_epoch_and_across_epoch_boundary_continues_order(assets, tmp_path, monkeypatch, restore_signal_handlers):
    data = write_csv(tmp_path / "indexed.csv", indexed_rows())
    recipe = tiny_recipe(
        assets, tmp_path / "run", data={"train_file": str(data)},
        training={"epochs": EPOCHS, "per_device_batch_size": BATCH, "log_sample_fingerprints": True},
        output={"save_every_epoch": False},
    )
    fresh = write_recipe(tmp_path / "fresh.yaml", {**recipe, "output": {**recipe["output"], "dir": str(tmp_path / "fresh")}})
    assert run_in_process(fresh) == 0
    index = example_index(assets)
    expected = examples_by_step(tmp_path / "fresh", index)
    assert len(expected) == EPOCHS * STEPS_PER_EPOCH
    for epoch in range(EPOCHS):
        seen = sum(expected[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH], [])
        assert sorted(seen) == list(range(EXAMPLES)), "an epoch must see every example exactly once"
    assert expected[:STEPS_PER_EPOCH] != expected[STEPS_PER_EPOCH:], "epochs are shuffled differently"

    interrupted = write_recipe(tmp_path / "interrupted.yaml", recipe)
    # Stop at step 3 (mid-epoch 0), then at step 10 (mid-epoch 1, after crossing the epoch boundary), then finish.
    for stop_step, overrides in ((3, ()), (10, ("output.resume_from=auto",))):
        with monkeypatch.context() as patched:
            for owner, name, replacement in patches("sigusr1", stop_step):
                patched.setattr(owner, name, replacement)
            assert run_in_process(interrupted, *overrides) == EXIT_STOPPED_FOR_RESUME
    assert run_in_process(interrupted, "output.resume_from=auto") == 0

    logged_steps = [r["step"] for r in read_metrics_log(tmp_path / "run") if r["kind"] == "train"]
    assert logged_steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1)), "each step trained exactly once"
    assert examples_by_step(tmp_path / "run", index) == expected
