"""Shared fixtures: tiny saved models, small data, and ways to run the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from builders import build_tiny_bert, build_tiny_llama, sentiment_rows, sft_rows, write_csv, write_jsonl  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny models (BERT with/without dropout, Llama without a pad token, a chat Llama) and data, built once."""
    root = tmp_path_factory.mktemp("assets")
    return {
        "bert": build_tiny_bert(root / "bert"),
        "bert_no_dropout": build_tiny_bert(root / "bert_no_dropout", dropout=0.0),
        "llama": build_tiny_llama(root / "llama"),
        "train_csv": write_csv(root / "train.csv", sentiment_rows(64, seed=0)),
        "eval_csv": write_csv(root / "eval.csv", sentiment_rows(32, seed=1)),
        "pair_train_csv": write_csv(root / "pair_train.csv", sentiment_rows(64, seed=2, pair=True)),
        "pair_eval_csv": write_csv(root / "pair_eval.csv", sentiment_rows(32, seed=3, pair=True)),
        "chat_llama": build_tiny_llama(root / "chat_llama", chat=True),
        "sft_train": write_jsonl(root / "sft_train.jsonl", sft_rows(64, seed=4)),
        "sft_eval": write_jsonl(root / "sft_eval.jsonl", sft_rows(16, seed=5)),
    }


def tiny_recipe(assets: dict[str, Path], out: Path, model: str = "bert", **sections: dict[str, Any]) -> dict[str, Any]:
    """A small valid recipe as a dict; `sections` are merged over the defaults section by section."""
    recipe: dict[str, Any] = {
        "model": {"name_or_path": str(assets[model])},
        "data": {"train_file": str(assets["train_csv"]), "eval_file": str(assets["eval_csv"]), "max_length": 64},
        "task": {"num_labels": 2},
        "training": {"epochs": 2, "per_device_batch_size": 8, "lr": 1e-3, "log_every_steps": 1},
        "evaluation": {"metrics": ["accuracy", "f1"]},
        "output": {"dir": str(out), "report_to": "none"},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_in_process(recipe_path: Path, *overrides: str) -> int:
    """The real entry point (`launcher.run.main`) in this process; Accelerate's singletons are reset first."""
    from accelerate.state import AcceleratorState, GradientState

    from launcher.run import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return main([str(recipe_path), *overrides])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python launcher/run.py ...` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO / "launcher" / "run.py"), *args],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


@torch.no_grad()
def eval_loss_of(model: torch.nn.Module, run_dir: Path) -> float:
    """Mean eval cross-entropy of `model` on the run's eval set, tokenized as the run did."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from launcher.tasks import prepare_task
    from launcher.recipe.loading import load_recipe

    recipe = load_recipe(run_dir / "recipe.resolved.yaml")
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenized = prepare_task(recipe, tokenizer).data.eval
    batch = DataCollatorWithPadding(tokenizer)([tokenized[i] for i in range(len(tokenized))])
    model.eval()
    return float(model(**batch).loss)
