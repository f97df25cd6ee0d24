"""Models and data the kit builds where it runs: nothing is downloaded and nothing large travels.

- Models at their real sizes with random (seeded) weights: a BERT-base classifier body (`BertConfig()`'s defaults,
  110M parameters) and a Llama-3-8B-shaped one (the public config.json values in `launcher.plan.memory`, 8.0B).
  Throughput and memory depend on shapes, not on weight values. The 8B model is built directly in bf16 on the GPU
  (seconds) and saved once; the launcher then loads it like any checkpoint.
- Tokenizers with a word-level vocabulary of the real size (30,522 and 128,256 entries), one token per word, so
  a text of W words is W tokens (plus BERT's [CLS]/[SEP]).
- Synthetic reviews with a learnable signal: each class has its own marker words, sprinkled among filler words.
  Lengths follow `length_words`: long enough that every text fills `max_length` (the "seq 128" / "seq 512"
  measurements), or spread like real reviews so padding and length grouping matter.

Smoke sizes (`SMOKE_SHAPES`) are tiny versions of the same builders, for CI.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaModel
from transformers import PreTrainedTokenizerFast

from launcher.plan.memory import KNOWN_CONFIGS

LLAMA3_8B = "meta-llama/Meta-Llama-3-8B"
MARKERS_PER_CLASS = 12


@dataclass(frozen=True)
class ModelShape:
    """What the builders vary between the real run and the CI smoke run."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int


def llama3_8b_shape() -> ModelShape:
    config = KNOWN_CONFIGS[LLAMA3_8B]
    return ModelShape(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                      config.num_attention_heads, config.num_key_value_heads, config.max_position_embeddings)


def bert_base_shape() -> ModelShape:
    config = BertConfig()  # the defaults are bert-base-uncased's shape
    return ModelShape(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                      config.num_attention_heads, config.num_attention_heads, config.max_position_embeddings)


REAL_SHAPES: dict[str, Callable[[], ModelShape]] = {"bert": bert_base_shape, "llama": llama3_8b_shape}
SMOKE_SHAPES = {
    "bert": ModelShape(vocab_size=600, hidden_size=32, intermediate_size=64, layers=2, heads=2, kv_heads=2, max_positions=512),
    "llama": ModelShape(vocab_size=600, hidden_size=32, intermediate_size=64, layers=2, heads=4, kv_heads=2, max_positions=1024),
}


def vocabulary(size: int, specials: list[str]) -> dict[str, int]:
    """`specials` first, then made-up words w0, w1, ... up to `size` entries."""
    words = specials + [f"w{i}" for i in range(size - len(specials))]
    return {word: i for i, word in enumerate(words)}


def build_bert(folder: Path, shape: ModelShape, seed: int = 0) -> Path:
    vocab = vocabulary(shape.vocab_size, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=shape.max_positions)
    config = BertConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate_size,
                        max_position_embeddings=shape.max_positions)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_llama(folder: Path, shape: ModelShape, seed: int = 0) -> Path:
    """A Llama body (no head: the launcher adds the classifier's) in bf16, built on the GPU when there is one (an
    8B model in seconds), with a tokenizer that has EOS but no pad token, as Llama 3's."""
    vocab = vocabulary(shape.vocab_size, ["<unk>", "<s>", "</s>"])
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        model_max_length=shape.max_positions)
    config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=shape.max_positions, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaModel(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


BUILDERS = {"bert": build_bert, "llama": build_llama}


def build_model(kind: str, folder: Path, smoke: bool) -> Path:
    """The model of `kind` at its real size, or its smoke size; kept if already built (a rerun on the same machine)."""
    if (folder / "config.json").exists():
        return folder
    shape = SMOKE_SHAPES[kind] if smoke else REAL_SHAPES[kind]()
    return BUILDERS[kind](folder, shape)


def review(rng: random.Random, label: int, words: int, vocab_size: int, num_labels: int) -> str:
    """`words` words: filler from the vocabulary's tail, and 1 in 8 a marker of `label`'s class."""
    markers = range(label * MARKERS_PER_CLASS, (label + 1) * MARKERS_PER_CLASS)
    filler_start = num_labels * MARKERS_PER_CLASS
    return " ".join(
        f"w{rng.choice(markers)}" if rng.random() < 0.125 else f"w{rng.randrange(filler_start, vocab_size - 10)}"
        for _ in range(words)
    )


def write_reviews(path: Path, count: int, num_labels: int, length_words: Callable[[random.Random], int],
                  vocab_size: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        for _ in range(count):
            label = rng.randrange(num_labels)
            writer.writerow({"text": review(rng, label, length_words(rng), vocab_size, num_labels), "label": label})
    return path


def at_least(tokens: int) -> Callable[[random.Random], int]:
    """Every text fills `tokens` after truncation."""
    return lambda rng: tokens + rng.randrange(0, tokens // 4 + 1)


def exactly(words: int) -> Callable[[random.Random], int]:
    return lambda rng: words


def review_like(median: int, cap: int) -> Callable[[random.Random], int]:
    """Log-normal lengths around `median` words (sigma 0.6: Yelp-like spread, a long tail truncated later)."""
    return lambda rng: max(4, min(cap, int(rng.lognormvariate(0, 0.6) * median)))


def write_data(folder: Path, train: int, evaluation: int, num_labels: int, length_words: Callable[[random.Random], int],
               vocab_size: int) -> tuple[Path, Path]:
    return (write_reviews(folder / "train.csv", train, num_labels, length_words, vocab_size, seed=1),
            write_reviews(folder / "eval.csv", evaluation, num_labels, length_words, vocab_size, seed=2))
