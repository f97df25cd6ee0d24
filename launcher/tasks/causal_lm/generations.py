"""Greedy continuations of a few eval prompts after each evaluation, written beside what the data answers: how a
generator's outputs change over training (SFT and DPO alike)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled

GENERATIONS = "generations"  # the run directory's folder of greedy generations, one file per evaluation


@torch.no_grad()
def write_generations(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict[str, Any]],
                      plain: bool, max_new_tokens: int, accelerator: Accelerator, step: int, run_dir: Path) -> None:
    """Each example's `prompt` continued greedily, written with the example's other fields to
    `generations/step-N.jsonl`. `plain`: the prompts are plain text (the tokenizer adds its BOS), not rendered by a
    chat template. Every rank generates: under ZeRO-3 each forward gathers the layers collectively."""
    if not examples:
        return
    generator = accelerator.unwrap_model(model)
    records = []
    for example in examples:
        inputs = tokenizer(example["prompt"], add_special_tokens=plain, return_tensors="pt").to(accelerator.device)
        output = generator.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, synced_gpus=is_deepspeed_zero3_enabled())
        generated = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        records.append({**example, "generated": generated})
    if accelerator.is_main_process:
        folder = run_dir / GENERATIONS
        folder.mkdir(exist_ok=True)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (folder / f"step-{step:08d}.jsonl").write_text(lines, encoding="utf-8")
