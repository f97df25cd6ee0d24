"""Shared fixtures: tiny saved models and small data, built once; the helpers that use them are in support/.

The test folders follow the product: unit/ (one module's behaviour, no training run), integration/ (real runs of
the entry points, in this process or as a user runs them, one or more processes), cluster/ (a real Slurm
cluster brought up on this machine), device/ (the accelerator kit, and tests that need a CUDA GPU).
pyproject.toml puts support/ on the import path (`from recipes import tiny_recipe`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before datasets is imported (it reads the variable once): the suite's datasets and preparation caches live and
# die with the session, and never fill or read the user's ~/.cache.
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="launcher-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from faults import restore_signal_handlers  # noqa: F401 (a fixture, for every folder)
from slurm_cluster import slurm_cluster  # noqa: F401 (a fixture, for every folder)
from builders import build_tiny_bert, build_tiny_llama, preference_rows, sentiment_rows, sft_rows, write_csv, write_jsonl
from recipes import write_run
from runs import run_cli

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
        "pairs_train": write_jsonl(root / "pairs_train.jsonl", preference_rows(48, seed=6)),
        "pairs_eval": write_jsonl(root / "pairs_eval.jsonl", preference_rows(16, seed=7)),
    }


@pytest.fixture(scope="module")
def start_model(assets, tmp_path_factory) -> dict[str, Path]:
    """The tiny dropout-free BERT saved with a seeded 2-label head; returned as an `assets` dict for tiny_recipe."""
    folder = tmp_path_factory.mktemp("bert_with_head")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(assets["bert_no_dropout"], num_labels=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets["bert_no_dropout"]).save_pretrained(folder)
    return {**assets, "start": folder}


@pytest.fixture(scope="module")
def one_process(start_model, tmp_path_factory) -> Path:
    """The reference: one process, 4 per device x 2 accumulation = global batch 8 (8 optimizer steps)."""
    folder = tmp_path_factory.mktemp("one_process")
    result = run_cli(str(write_run(folder, start_model, per_device=4, accumulation=2)))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"
