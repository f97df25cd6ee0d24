"""What the libraries say while a run loads and exports, cut down to what a user should act on.

Two messages are expected on every demo run and read like errors to newcomers: transformers' LOAD REPORT table
lists the new task head as MISSING (it is initialised randomly: fine-tuning trains it), and DeepSpeed, which
accelerate imports at export, warns on a CPU-only host that it "was unable to detect" a GPU. The head becomes
one line of the run plan; the weights that point at a real problem are still named, as warnings.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from itertools import chain
from typing import Iterable, Iterator, Optional

import torch
from transformers.utils import logging as transformers_logging

from launcher.distributed.devices import DeviceInfo

# The logger `from_pretrained` hands its LOAD REPORT to (transformers.utils.loading_report.log_state_dict_report).
TRANSFORMERS_LOADER_LOGGER = "transformers.modeling_utils"
LISTED_KEYS = 8


@contextmanager
def load_report_held() -> Iterator[None]:
    """Hold back transformers' LOAD REPORT while `from_pretrained` runs; its loading info carries the same keys.

    Only that one record is held: the logger's other warnings pass. If loading fails the report is logged after
    all, since transformers' error then says "look at the above report".
    """
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.funcName == "log_state_dict_report":
            held.append(record)
            return False
        return True

    logger = transformers_logging.get_logger(TRANSFORMERS_LOADER_LOGGER)
    logger.addFilter(hold)
    try:
        yield
    except BaseException:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)
        raise
    logger.removeFilter(hold)


def report_loading(model: torch.nn.Module, loading_info: dict, source: str) -> Optional[str]:
    """Warn (stderr) about backbone weights the checkpoint lacks, checkpoint weights the backbone has no place
    for and shape mismatches; return the plan line for what is expected: the new head, the checkpoint's own head."""
    missing_in_backbone, new_head = split_by_backbone(model, in_model_order(model, loading_info["missing_keys"]))
    unexpected_in_backbone, checkpoint_head = split_by_backbone(model, sorted(loading_info["unexpected_keys"]))
    problems = [
        (missing_in_backbone, "backbone weight(s) missing from the checkpoint, initialised randomly"),
        (unexpected_in_backbone, f"checkpoint weight(s) {type(model).__name__} has no place for, left unused"),
        ([f"{key} (checkpoint {tuple(saved)}, model {tuple(wanted)})"
          for key, saved, wanted in sorted(loading_info["mismatched_keys"])],
         "weight(s) of another shape in the checkpoint, initialised randomly"),
    ]
    for keys, what in problems:
        if keys:
            print(f"warning: {source}: {len(keys)} {what}: {listed(keys)}", file=sys.stderr)
    return new_head_note(new_head, checkpoint_head)


def split_by_backbone(model: torch.nn.Module, keys: list[str]) -> tuple[list[str], list[str]]:
    """(keys inside the backbone, keys outside it: a task head), each in the given order. Checkpoint keys may lack
    the backbone prefix (`encoder.…` from a bare `BertModel`), so the backbone's own module names count as inside."""
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        return keys, []
    inside = {getattr(model, "base_model_prefix", ""), *(name for name, _ in backbone.named_children())}
    return [k for k in keys if k.split(".")[0] in inside], [k for k in keys if k.split(".")[0] not in inside]


def new_head_note(new_head: list[str], checkpoint_head: list[str]) -> Optional[str]:
    parts = []
    if new_head:
        parts.append(f"new head: {', '.join(new_head)} initialised randomly (expected: it is what fine-tuning trains)")
    if checkpoint_head:
        modules = sorted({key.split(".")[0] + ".*" for key in checkpoint_head})
        parts.append(f"the checkpoint's own head ({', '.join(modules)}) is left out")
    return "; ".join(parts) or None


def in_model_order(model: torch.nn.Module, keys: Iterable[str]) -> list[str]:
    """Keys in the order the model defines them (`classifier.weight` before `classifier.bias`), unknown ones last."""
    order = {name: i for i, (name, _) in enumerate(chain(model.named_parameters(), model.named_buffers()))}
    return sorted(keys, key=lambda key: (order.get(key, len(order)), key))


def listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f" and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else "")


def name_deepspeed_accelerator(device: DeviceInfo) -> None:
    """Tell DeepSpeed the device the launcher found before anything imports it (accelerate does, to unwrap the
    model at export), so that on a CPU-only host it does not warn "Setting accelerator to CPU ... unable to
    detect" a GPU. `DS_ACCELERATOR` is DeepSpeed's override of its auto-detection; a value already set is kept."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
