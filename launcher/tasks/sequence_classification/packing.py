"""`data.padding: packed` on the model side: one forward over a row of joined examples (built by
`launcher.tasks.sequence_classification.batches.PackedCollator`), each example classified at its own token.

Packed batches reach `classify_packed` through `launcher.model.forward_routes` (the model's own forward stays for padded
ones, so a resume may change `data.padding`).

Attention cost: under sdpa and eager the block-diagonal mask spans the whole row, so attention still computes
(sum of lengths)^2 scores per head, most of them masked; flash_attention_2 runs variable-length kernels instead.
The savings are in everything else (embeddings, projections, MLPs), which no longer see padding.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from launcher.model.forward_routes import add_forward_route, transformers_model_of
from launcher.model.loading import ModelError
from launcher.recipe.schema import Recipe

# Decoders whose sequence classifier is a backbone plus a `score` head classifying the last non-pad token, and whose
# attention keeps packed examples apart given `position_ids` and no mask: tests/integration/test_packing.py checks each one.
PACKED_ARCHITECTURES = ("gemma", "gemma2", "gemma3_text", "llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3")


def packing_problem(model_type: str) -> Optional[str]:
    """Why `data.padding: packed` cannot run on this model, or None."""
    if model_type not in PACKED_ARCHITECTURES:
        return (
            f"data.padding=packed: model type {model_type!r} is not a decoder known to keep packed examples apart "
            f"({', '.join(PACKED_ARCHITECTURES)}); encoders such as BERT attend in both directions, so packed examples "
            "would see each other. Use data.padding=dynamic, with data.group_by_length=true to cut padding"
        )
    return None


def check_packing(recipe: Recipe) -> list[str]:
    """Preflight: `data.padding: packed` suits the model (reads config.json only when reachable)."""
    if recipe.data.padding != "packed":
        return []
    try:
        config = AutoConfig.from_pretrained(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError):
        return []
    problem = packing_problem(config.model_type)
    return [problem] if problem else []


def enable_packed_batches(model: torch.nn.Module) -> None:
    """Let `model` (a transformers sequence classifier, or peft's wrapper of one) also take packed batches:
    those carry `classify_at`; any other batch (evaluation) goes to the model's own forward unchanged."""
    problem = packing_problem(transformers_model_of(model).config.model_type)
    if problem:
        raise ModelError(problem)
    add_forward_route(model, "classify_at", classify_packed)


def classify_packed(
    classifier: PreTrainedModel,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    classify_at: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
) -> SequenceClassifierOutputWithPast:
    """Per-token logits of the head, taken at each example's `classify_at`; the loss is the model's own
    (cross-entropy, mean over examples), as in a padded batch."""
    decoder = getattr(classifier, classifier.base_model_prefix)
    # use_cache=False: with a cache, transformers reads position_ids as decoding steps and builds one causal mask
    # over the whole row, so every example would attend to the ones before it.
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    logits = classifier.score(hidden)[0, classify_at]
    loss = None
    if labels is not None:
        loss = classifier.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=classifier.config)
    return SequenceClassifierOutputWithPast(loss=loss, logits=logits)
