"""The optimizer step on the host, as DeepSpeed ZeRO offload runs it: torch's fused AdamW (what the launcher builds
for offloaded states) against DeepSpeedCPUAdam (what DeepSpeed asks for by default) and torch's multi-tensor AdamW.

    DS_ACCELERATOR=cpu python -m benchmarks.host_adamw --params 20000000 --repeats 20 --name host-adamw-cpu

Offload keeps each rank's fp32 partition as one flat tensor, so one flat parameter of `--params` elements is
stepped with the same random gradient by every optimizer. Reports milliseconds per step, median [min-max] after one
untimed step, and each optimizer's largest difference to torch's fused AdamW after those steps (same arithmetic up
to rounding, or not). Writes JSON and a Markdown table with the machine and versions to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks.environment import describe_machine, library_version
from benchmarks.measure import spread
from benchmarks.report import RESULTS, publish
from launcher.distributed.devices import detect_device

HYPER = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def deepspeed_cpu_adam(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # builds its C++ op on first use (about a minute)

    return DeepSpeedCPUAdam(params, adamw_mode=True, **HYPER)


OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "torch_fused": lambda params: torch.optim.AdamW(params, fused=True, **HYPER),
    "torch_foreach": lambda params: torch.optim.AdamW(params, foreach=True, **HYPER),
    "deepspeed_cpu_adam": deepspeed_cpu_adam,
}


def time_steps(name: str, start: torch.Tensor, gradient: torch.Tensor, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each timed step, and the parameter after all steps (one untimed step first)."""
    parameter = torch.nn.Parameter(start.clone())
    parameter.grad = gradient
    optimizer = OPTIMIZERS[name]([parameter])
    optimizer.step()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - began)
    return seconds, parameter.detach()


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"Host AdamW step, {result['params']:,} fp32 parameters, {result['repeats']} timed steps; {machine['cpu']}, "
        f"{machine['cpu_cores_logical']} logical cores, torch {machine['libraries'].get('torch')}, deepspeed "
        f"{result['deepspeed']}.",
        "",
        "| optimizer | ms per step, median [min-max] | max abs difference to torch_fused |",
        "| --- | --- | --- |",
    ]
    for name, row in result["optimizers"].items():
        ms = row["step_ms"]
        lines.append(f"| {name} | {ms['median']:.1f} [{ms['min']:.1f}-{ms['max']:.1f}] | {row['max_abs_difference']:.2e} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time AdamW steps on the host, as ZeRO offload runs them.")
    parser.add_argument("--params", type=int, default=20_000_000, help="elements of the flat fp32 partition")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="host-adamw", help="file stem of the JSON and Markdown written")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    names = args.optimizers.split(",")
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        raise SystemExit(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(args.params, generator=generator)
    gradient = torch.randn(args.params, generator=generator)
    runs = {name: time_steps(name, start, gradient, args.repeats) for name in names}
    reference = (runs.get("torch_fused") or time_steps("torch_fused", start, gradient, args.repeats))[1]
    rows = {
        name: {"step_ms": spread([1000 * s for s in seconds]),
               "max_abs_difference": float((parameter - reference).abs().max())}
        for name, (seconds, parameter) in runs.items()
    }
    result = {
        "command": "python -m benchmarks.host_adamw " + " ".join(sys.argv[1:] if argv is None else argv),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(detect_device()),
        "deepspeed": library_version("deepspeed"),
        "params": args.params,
        "repeats": args.repeats,
        "hyperparameters": HYPER,
        "optimizers": rows,
    }
    publish(result, args.results_dir, args.name, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
