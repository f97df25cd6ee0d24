"""Does asynchronous saving take a checkpoint off the critical path? One process, one run, side by side:

1. the launcher's save (`Checkpointer.save`: Accelerate's `save_state`, random states, sha256 of every file, fsync,
   rename), timed on the critical path;
2. Accelerate's `save_state` alone: the write of the same files, what async takes off the critical path at best;
3. `torch.distributed.checkpoint.async_save` of the same model and optimizer state (DCP's default: a copy into CPU
   memory on the critical path, the write in a background thread), and every training step that runs while the
   write is still going. Its critical-path cost is the time it blocks plus what the steps beside the write lose
   against steps alone. It writes only; sealing (sha256, fsync, manifest) would add background work, so this is
   the most async can gain.

    python -m benchmarks.async_checkpoint                 # 135M parameters, 3 repeats; about 3 minutes on 2 CPU cores
    python -m benchmarks.async_checkpoint --size smoke    # checks this script in seconds; not a result

A random-weight Llama classifier (benchmarks/checkpoint_cost.py's shapes) with fp32 AdamW state, 4 x 64 tokens a
step. Results: `benchmarks/results/NAME.{json,md}`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import get_state_dict
from transformers import LlamaConfig, LlamaForSequenceClassification

from benchmarks.checkpoint_cost import SHAPES, VOCAB
from benchmarks.environment import describe_machine, load_1min
from benchmarks.measure import spread
from benchmarks.report import RESULTS, publish
from launcher.distributed.devices import detect_device
from launcher.train.checkpoints import Checkpointer, TrainPosition, folder_bytes

REPO = Path(__file__).resolve().parents[1]
BATCH, TOKENS = 4, 64


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], float]:
    inputs = torch.randint(2, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(BATCH) % 2

    def step() -> float:
        started = time.perf_counter()
        model(input_ids=inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    return step


def launcher_save(checkpointer: Checkpointer, number: int) -> dict[str, float]:
    started = time.perf_counter()
    folder = checkpointer.save(TrainPosition(optimizer_step=number))
    return {"critical_s": time.perf_counter() - started, "bytes": folder_bytes(folder)}


def accelerate_write(accelerator: Accelerator, folder: Path) -> dict[str, float]:
    started = time.perf_counter()
    accelerator.save_state(str(folder))
    return {"critical_s": time.perf_counter() - started, "bytes": folder_bytes(folder)}


def async_save(model, optimizer, step: Callable[[], float], folder: Path, alone_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    future = dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder), no_dist=True)
    blocked = time.perf_counter() - started
    beside = []
    while not future.done():
        beside.append(step())
    future.result()
    lost = sum(beside) - len(beside) * alone_s
    return {"blocked_s": blocked, "steps_beside_write_s": beside, "lost_by_steps_s": lost, "critical_s": blocked + lost,
            "write_done_s": time.perf_counter() - started, "bytes": folder_bytes(folder)}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    sync, write, background = result["launcher_save"], result["accelerate_write"], result["async_save"]

    def cell(rows: list[dict], key: str) -> str:
        values = spread([row[key] for row in rows])
        return f"{values['min']:.2f} / {values['median']:.2f} / {values['max']:.2f}"

    alone = spread(result["step_alone_s"])
    return "\n".join([
        f"# Asynchronous checkpoint saving, {result['parameters'] / 1e6:.0f}M parameters, one process", "",
        f"{m['cpu']}, {m['cpu_cores_logical']} logical cores, {m['memory_bytes'] / 2**30:.0f} GiB; torch "
        f"{m['libraries'].get('torch')}, accelerate {m['libraries'].get('accelerate')}; load before "
        f"{result['load_1min_before']:.2f}, after {result['load_1min_after']:.2f}. Checkpoint {sync[0]['bytes'] / 1e9:.2f} GB "
        f"(fp32 weights and AdamW state); a training step alone {alone['min']:.2f} / {alone['median']:.2f} / "
        f"{alone['max']:.2f} s; {len(sync)} repeats, min / median / max in seconds.", "",
        "| save | blocks training | steps beside the write lose | critical-path cost | written after |",
        "|---|---|---|---|---|",
        f"| launcher (`save_state`, sha256, fsync, rename) | {cell(sync, 'critical_s')} | - | {cell(sync, 'critical_s')} | "
        f"{cell(sync, 'critical_s')} |",
        f"| Accelerate's `save_state` alone (the same files, written) | {cell(write, 'critical_s')} | - | "
        f"{cell(write, 'critical_s')} | {cell(write, 'critical_s')} |",
        f"| `torch.distributed.checkpoint.async_save` (write only) | {cell(background, 'blocked_s')} | "
        f"{cell(background, 'lost_by_steps_s')} | {cell(background, 'critical_s')} | {cell(background, 'write_done_s')} |",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.async_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="135m", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench-async-checkpoint")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="async-checkpoint-cpu")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, num_labels=2, pad_token_id=0, **SHAPES[args.size])
    accelerator = Accelerator()
    model = accelerator.prepare(LlamaForSequenceClassification(config))
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1e-5))
    step = training_step(model, optimizer)
    step()  # AdamW's state exists from the first step on
    result: dict[str, Any] = {"machine": describe_machine(detect_device()), "load_1min_before": load_1min(),
                              "size": args.size, "parameters": sum(p.numel() for p in model.parameters()),
                              "step_alone_s": [step() for _ in range(3)]}
    alone = statistics.median(result["step_alone_s"])
    checkpointer = Checkpointer(accelerator, args.work / "launcher", keep_last=1, identity={})
    result["launcher_save"], result["accelerate_write"], result["async_save"] = [], [], []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}", flush=True)
        result["launcher_save"].append(launcher_save(checkpointer, repeat + 1))
        result["accelerate_write"].append(accelerate_write(accelerator, args.work / f"write-{repeat}"))
        result["async_save"].append(async_save(model, optimizer, step, args.work / f"async-{repeat}", alone))
        for copy in (f"write-{repeat}", f"async-{repeat}"):
            shutil.rmtree(args.work / copy)
    result["load_1min_after"] = load_1min()
    publish(result, args.results_dir, args.name, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
