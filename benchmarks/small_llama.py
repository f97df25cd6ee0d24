"""A Llama-architecture model at a size a 2-core CPU trains in minutes, to measure the decoder-only variants
(`launcher_packed`) on the demo's real review lengths. No Llama checkpoint installs offline, so the weights are
random (seeded) and the tokenizer is the demo model's WordPiece one: every variant starts from the same
weights and sees the same tokens, which is what a throughput comparison needs; accuracies are those of a
model trained from scratch on 1,000 snippets.

    python -m benchmarks.small_llama models/small-llama-random
    python -m benchmarks.compare recipes/demo.yaml model.name_or_path=models/small-llama-random \\
        --samples 1000 --variants launcher_group_by_length,launcher_packed,launcher_dynamic
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

DEMO_TOKENIZER = Path("models/all-MiniLM-L6-v2")


def build(folder: Path, tokenizer_from: Path, seed: int) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight small Llama (hidden 256, 4 layers) folder.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, default=DEMO_TOKENIZER, help="folder of the tokenizer to reuse")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {build(args.folder, args.tokenizer_from, args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
