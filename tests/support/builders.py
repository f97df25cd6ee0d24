"""Tiny real models, tokenizers and data the tests build offline and save like hub checkpoints."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "moving", "smart"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "poor", "messy", "flat"]
FILLER = ["the", "film", "movie", "plot", "acting", "was", "is", "very", "quite", "and", "a", "story", "cast", "script"]
WORDS = POSITIVE + NEGATIVE + FILLER


def build_tiny_bert(folder: Path, dropout: float = 0.1) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level WordPiece vocabulary, saved with `save_pretrained`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    # transformers 5 takes the vocabulary as `vocab=` and silently ignores a `vocab_file=` argument.
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)  # the same weights whatever ran before: tests compare against thresholds
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# A chat template in the shape of the common ones (role markers, an end-of-turn token after each message).
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_llama(folder: Path, chat: bool = False) -> Path:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads) with a word-level tokenizer that has EOS but no pad token;
    with `chat`, role markers as special tokens and a chat template (a tiny instruct model)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *WORDS, *(CHAT_MARKERS if chat else [])])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=128,
        **({"additional_special_tokens": CHAT_MARKERS, "chat_template": TINY_CHAT_TEMPLATE} if chat else {}),
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    (LlamaForCausalLM if chat else LlamaModel)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentiment_rows(n: int, seed: int, pair: bool = False) -> list[dict]:
    """Learnable synthetic reviews: the label is whether the sentiment words are positive (1) or negative (0).
    With `pair`, the label says whether two sentences agree in sentiment (an MRPC-like paraphrase task)."""
    rng = random.Random(seed)

    def sentence(positive: bool) -> str:
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
        return " ".join(words)

    rows = []
    for i in range(n):
        first = rng.random() < 0.5
        if pair:
            same = rng.random() < 0.5
            rows.append({"idx": i, "sentence1": sentence(first), "sentence2": sentence(first == same), "label": int(same)})
        else:
            rows.append({"idx": i, "text": sentence(first), "label": int(first)})
    return rows


def sft_rows(n: int, seed: int) -> list[dict]:
    """Prompt / completion / chat rows whose trained parts differ a lot in length (1 to 12 words): the completion
    repeats the sentiment of the prompt, so the task is learnable."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        prompt = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8))) + " " + rng.choice(POSITIVE if positive else NEGATIVE)
        completion = " ".join(rng.choice(POSITIVE if positive else NEGATIVE) for _ in range(rng.choice([1, 2, 12])))
        # As in prompt / completion datasets, the completion carries its separator from the prompt.
        rows.append({"prompt": prompt, "completion": " " + completion, "label": "positive" if positive else "negative",
                     "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# Topics drawn from the tiny tokenizer's vocabulary (other words would all be [UNK]).
TOPICS = {"praise": POSITIVE[:4], "blame": NEGATIVE[:4], "style": POSITIVE[4:]}


def topic_rows(n: int, seed: int) -> list[dict]:
    """Multi-label rows: each text mentions words of 0 to 3 topics among filler; its labels are those topics, as a
    list (`topics`) and as one 0/1 column per topic."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        present = sorted(topic for topic in TOPICS if rng.random() < 0.4)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
        for topic in present:
            words.insert(rng.randrange(len(words) + 1), rng.choice(TOPICS[topic]))
        rows.append({"text": " ".join(words), "topics": present, **{topic: int(topic in present) for topic in TOPICS}})
    return rows


def rating_rows(n: int, seed: int) -> list[dict]:
    """Regression rows: a review's `score` from 0 to 5, high for positive sentiment words, low for negative
    ones, with noise."""
    rng = random.Random(seed)
    return [{"text": row["text"], "score": round((4.0 if row["label"] else 1.0) + rng.uniform(-0.8, 0.8), 2)}
            for row in sentiment_rows(n, seed)]


def preference_rows(n: int, seed: int) -> list[dict]:
    """Preference pairs: a review as the prompt, the chosen answer in its sentiment and the rejected one in the
    other (1 to 6 words each, so pairs differ in length); also as chat messages (`chat_prompt`, `chat_chosen`,
    `chat_rejected`) and as whole conversations (`conversation_chosen`, `conversation_rejected`)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        prompt = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8))) + " " + rng.choice(POSITIVE if positive else NEGATIVE)
        chosen, rejected = (" ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
                            for words in ((POSITIVE, NEGATIVE) if positive else (NEGATIVE, POSITIVE)))
        user = [{"role": "user", "content": prompt}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "chat_prompt": user, "chat_chosen": [{"role": "assistant", "content": chosen}],
                     "chat_rejected": [{"role": "assistant", "content": rejected}],
                     "conversation_chosen": user + [{"role": "assistant", "content": chosen}],
                     "conversation_rejected": user + [{"role": "assistant", "content": rejected}],
                     "margin": round(rng.uniform(0.0, 1.0), 2)})
    return rows
