"""What a checkpoint costs as models grow: seconds and GB per save and per load, from the run's own log
(`metrics.jsonl` kind `checkpoint`, `run_summary.json` `checkpoints`), for Llama-shaped models with random
weights, under one process, two DDP processes (whole state, written by rank 0) and two FSDP2 processes
(`SHARDED_STATE_DICT`: each rank writes its shards through torch.distributed.checkpoint).

    python -m benchmarks.checkpoint_cost                 # 135M and 491M parameters; about 8 minutes on 2 CPU cores
    python -m benchmarks.checkpoint_cost --sizes 135m    # one size

Each configuration trains 2 steps (1 example per device, 32 tokens) saving after each, then a second run
resumes from the first checkpoint (a timed read) and trains the second step again. Saves include everything on
the critical path: Accelerate's `save_state`, the launcher's random states, sha256 of every file, fsync, rename.
Results: `benchmarks/results/NAME.{json,md}`, the table also in docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks.environment import describe_machine, load_1min
from benchmarks.processes import run_child
from benchmarks.report import RESULTS, publish
from launcher.distributed.devices import detect_device

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # SmolLM2-135M's shape, and a deeper, wider one of 491M parameters (same tokenizer size)
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3},
    "490m": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2},  # checks this script in seconds; not a result
}
VOCAB = 49152
SKIPPED = {("490m", "2 x DDP"): "two whole replicas with gradients, AdamW state and DDP buckets need about 21 GB "
                                 "of this machine's 24"}
TOPOLOGIES = {  # name: (processes, accelerate config or None)
    "1 process": (1, None),
    "2 x DDP": (2, "accelerate_configs/cpu_ddp.yaml"),
    "2 x FSDP2 sharded": (2, "accelerate_configs/fsdp2.yaml"),
}


def build_model(folder: Path, shape: dict[str, int]) -> int:
    """A random-weight Llama classifier saved with a small word-level tokenizer over the vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, num_labels=2, pad_token_id=0, **shape)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_data(path: Path, rows: int) -> Path:
    lines = ["text,label"] + [f"{' '.join(f'w{(7 * r + i) % (VOCAB - 2) + 2}' for i in range(32))},{r % 2}" for r in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe(folder: Path, model: Path, data: Path, **output: Any) -> Path:
    body = {"model": {"name_or_path": str(model)},
            "data": {"train_file": str(data), "max_length": 64, "cache_dir": str(folder / "cache")},
            "task": {"num_labels": 2},
            "training": {"epochs": 1, "per_device_batch_size": 1, "lr": 1e-5, "precision": "fp32", "log_every_steps": 1},
            "evaluation": {"metrics": ["accuracy"]},
            "output": {"dir": str(folder / "run"), "report_to": "none", "save_every_steps": 1, "save_every_epoch": False,
                       "keep_last": 2, **output}}
    path = folder / ("resume.yaml" if output else "recipe.yaml")
    path.write_text(yaml.safe_dump(body))
    return path


def launch_command(processes: int, config: str | None, recipe_path: Path) -> list[str]:
    run = str(REPO / "launcher" / "run.py")
    if processes == 1:
        return [sys.executable, run, str(recipe_path)]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
               "--num_processes", str(processes)]
    if "fsdp2" in config:
        command += ["--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
    return [*command, run, str(recipe_path)]


def measure(folder: Path, model: Path, processes: int, config: str | None) -> dict[str, Any]:
    data = write_data(folder / "train.csv", 2 * processes)  # 2 steps of 1 per device
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(max(1, 2 // processes))}
    first = run_child(launch_command(processes, config, recipe(folder, model, data)), env, folder / "first.log", 3600)
    assert first.returncode == 0, (folder / "first.log").read_text()[-3000:]
    saves = json.loads((folder / "run" / "run_summary.json").read_text())["checkpoints"]["saves"]
    checkpoint = folder / "run" / "checkpoints" / "step-00000001"
    resumed = recipe(folder, model, data, resume_from=str(checkpoint))
    second = run_child(launch_command(processes, config, resumed), env, folder / "second.log", 3600)
    assert second.returncode == 0, (folder / "second.log").read_text()[-3000:]
    load = json.loads((folder / "run" / "run_summary.json").read_text())["checkpoints"]["load"]
    return {"saves": saves, "load": load, "peak_rss_bytes": max(first.peak_rss_bytes, second.peak_rss_bytes)}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['cpu_cores_logical']} logical cores, {m['memory_bytes'] / 2**30:.0f} GiB; torch "
             f"{m['libraries'].get('torch')}, accelerate {m['libraries'].get('accelerate')}; load before "
             f"{result['load_1min_before']:.2f}, after {result['load_1min_after']:.2f}. Random-weight Llama classifiers, "
             "fp32 weights and AdamW state; 2 saves (min-max shown) and 1 load each.", "",
             "| model | topology | checkpoint GB | save s | save GB/s | load s | load GB/s |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['parameters'] / 1e6:.0f}M | {row['topology']} | not measured: {row['skipped']} | | | | |")
            continue
        saves, load = row["saves"], row["load"]
        seconds = sorted(s["save_seconds"] for s in saves)
        rates = sorted(s["save_gb_per_s"] for s in saves)
        lines.append(f"| {row['parameters'] / 1e6:.0f}M | {row['topology']} | {saves[-1]['save_bytes'] / 1e9:.2f} | "
                     f"{seconds[0]:.1f}-{seconds[-1]:.1f} | {rates[0]:.2f}-{rates[-1]:.2f} | {load['load_seconds']:.1f} | "
                     f"{load['load_gb_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="135m,490m")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench-checkpoints")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="checkpoint-cost-cpu")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": describe_machine(detect_device()), "load_1min_before": load_1min(), "rows": []}
    for size in args.sizes.split(","):
        model = args.work / f"model-{size}"
        shutil.rmtree(args.work / size, ignore_errors=True)
        parameters = build_model(model, SHAPES[size])
        for name in args.topologies.split(","):
            processes, config = TOPOLOGIES[name]
            if (size, name) in SKIPPED:
                result["rows"].append({"size": size, "parameters": parameters, "topology": name, "skipped": SKIPPED[size, name]})
                continue
            folder = args.work / size / name.replace(" ", "_")
            folder.mkdir(parents=True)
            print(f"{size} ({parameters / 1e6:.0f}M), {name}", flush=True)
            row = {"size": size, "parameters": parameters, "topology": name, **measure(folder, model, processes, config)}
            result["rows"].append(row)
            shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)  # GBs each; the numbers are kept
    result["load_1min_after"] = load_1min()
    publish(result, args.results_dir, args.name, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
