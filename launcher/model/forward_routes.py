"""Extra kinds of batch a model takes besides its own: calls that pass a marker keyword (`classify_at` for packed
classification, `targets` for SFT) go to a function of the task; every other call (evaluation, generation) goes to
the model's own forward unchanged.

The forward is replaced on the instance, as Accelerate does for autocast, rather than wrapped in another module:
the model stays the object everything else handles, with the same `state_dict` keys (checkpoints, the export), still
a `PeftModel` under LoRA, still carrying the `config` DeepSpeed sizes its buffers from and the `_no_split_modules`
FSDP wraps by. DDP and DeepSpeed keep calling this top-level module, so their forward bookkeeping runs as usual.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import torch
from peft import PeftModel
from transformers import PreTrainedModel


def transformers_model_of(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model; under LoRA its layers already hold the adapters (and a classifier's head is peft's copy)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def add_forward_route(model: torch.nn.Module, keyword: str, route: Callable[..., Any]) -> None:
    """Calls of `model` passing `keyword` (not None) go to `route(transformers_model, keyword=value, **rest)`."""
    own_forward = model.forward

    def forward(self, *args, **kwargs):
        if kwargs.get(keyword) is None:
            kwargs.pop(keyword, None)
            return own_forward(*args, **kwargs)
        return route(transformers_model_of(self), **kwargs)

    model.forward = MethodType(forward, model)
