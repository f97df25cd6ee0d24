"""FLOPs per token, FLOP/s and MFU against numbers computed by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from benchmarks.flops import (
    TransformerShape,
    count_non_embedding_parameters,
    model_flops_utilization,
    peak_bf16_flops,
    shape_from_pretrained,
    shape_of,
    training_flops,
    training_flops_per_token,
)

# all-MiniLM-L6-v2 + a 2-class head, by hand. Per layer: Q, K, V, O 4 x (384*384 + 384) = 591,360; FFN
# 384*1536 + 1536 + 1536*384 + 384 = 1,181,568; two LayerNorms 2 x 768 -> 1,774,464; x 6 layers = 10,646,784.
# Plus the embeddings' LayerNorm 768, pooler 384*384 + 384 = 147,840, classifier 384*2 + 2 = 770.
MINILM_NON_EMBEDDING = 10_646_784 + 768 + 147_840 + 770
MINILM_EMBEDDING = 30522 * 384 + 512 * 384 + 2 * 384
MINILM = TransformerShape(MINILM_NON_EMBEDDING, layers=6, heads=12, head_dim=32)


def minilm_config() -> BertConfig:
    return BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=2)


def test_non_embedding_parameters_of_minilm_match_the_hand_count():
    config = minilm_config()
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert count_non_embedding_parameters(model) == MINILM_NON_EMBEDDING == 10_796_162
    assert sum(p.numel() for p in model.parameters()) == MINILM_NON_EMBEDDING + MINILM_EMBEDDING
    assert shape_of(model, config) == MINILM


def test_shape_from_a_saved_model(assets):
    # Tiny BERT (hidden 32, FFN 64, 2 layers, 2 heads): per layer 4*(32*32+32) + 32*64+64 + 64*32+32 + 2*64 = 8,544.
    shape = shape_from_pretrained(str(assets["bert"]), num_labels=2)
    assert shape == TransformerShape(2 * 8_544 + 64 + (32 * 32 + 32) + (32 * 2 + 2), layers=2, heads=2, head_dim=16)


def test_flops_per_token_is_6n_plus_the_attention_term():
    # 6 * 10,796,162 = 64,776,972; 12 * 6 layers * 12 heads * 32 dims * 64 tokens = 1,769,472.
    assert training_flops_per_token(MINILM, 64) == 64_776_972 + 1_769_472
    assert training_flops_per_token(MINILM, 0) == 6 * MINILM_NON_EMBEDDING


def test_training_flops_use_the_mean_sequence_length():
    # 8 sequences, 256 real tokens: T = 32, attention 12*6*12*32*32 = 884,736 per token.
    assert training_flops(MINILM, tokens=256, sequences=8) == 256 * (64_776_972 + 884_736)
    assert training_flops(MINILM, tokens=0, sequences=0) == 0.0


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("Ascend910B3", 320.0),
])
def test_peak_table_matches_device_names(name, tflops):
    assert peak_bf16_flops(name).tflops == tflops


def test_no_peak_and_no_mfu_on_a_cpu():
    assert peak_bf16_flops("cpu") is None
    assert model_flops_utilization(1e12, None) is None


def test_mfu_is_achieved_over_the_peak_of_all_devices():
    h100 = peak_bf16_flops("NVIDIA H100 80GB HBM3")
    assert model_flops_utilization(494.5e12, h100) == pytest.approx(0.5)
    assert model_flops_utilization(494.5e12, h100, devices=2) == pytest.approx(0.25)
