"""Tokenizer and sequence-classification model from the recipe, optional LoRA, and the final export."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from launcher.data import LabelSpace
from launcher.recipe import LoraSection, ModelSection, Recipe

# Attention projections are where LoRA pays off most per parameter (LoRA paper, section 7.1).
LORA_TARGETS_BY_ARCHITECTURE = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(model: ModelSection) -> PreTrainedTokenizerBase:
    """The model's tokenizer; decoder models without a pad token pad with EOS (batches need one)."""
    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{model.name_or_path}: tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_targets(lora: LoraSection, model_type: str) -> list[str]:
    if lora.target_modules:
        return lora.target_modules
    if model_type not in LORA_TARGETS_BY_ARCHITECTURE:
        raise ValueError(
            f"lora.target_modules: no default for architecture {model_type!r}; name the modules to adapt "
            f"(defaults exist for {', '.join(sorted(LORA_TARGETS_BY_ARCHITECTURE))})"
        )
    return LORA_TARGETS_BY_ARCHITECTURE[model_type]


def load_model(recipe: Recipe, labels: LabelSpace, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """`AutoModelForSequenceClassification` with the label names, pad token and LoRA the recipe asks for."""
    spec = recipe.model
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.name_or_path,
        num_labels=recipe.task.num_labels,
        id2label=labels.id2label,
        label2id=labels.label2id,
        dtype=TORCH_DTYPES[spec.load_dtype],
        attn_implementation=spec.attn_implementation,
        trust_remote_code=spec.trust_remote_code,
    )
    # Decoder classifiers pick the last non-pad token; without pad_token_id they refuse batches > 1.
    model.config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.enabled:
        model = apply_lora(model, recipe.lora)
    return model


def apply_lora(model: torch.nn.Module, lora: LoraSection) -> PeftModel:
    """peft LoRA for sequence classification: the head (`classifier` / `score`) is trained in full and saved."""
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(lora, model.config.model_type),
    )
    return get_peft_model(model, config)


def check_lora_architecture(recipe: Recipe) -> list[str]:
    """Preflight: the LoRA targets resolve for this model's architecture (reads config.json only when reachable)."""
    if not recipe.lora.enabled or recipe.lora.target_modules:
        return []
    try:
        model_type = AutoConfig.from_pretrained(recipe.model.name_or_path).model_type
    except (OSError, ValueError):
        return []
    try:
        lora_targets(recipe.lora, model_type)
    except ValueError as err:
        return [str(err)]
    return []


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def export_model(accelerator: Accelerator, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> dict[str, str]:
    """Write the final model (safetensors + config + tokenizer) and, with LoRA, the adapter; returns folders by kind.

    Every rank must call this: `get_state_dict` gathers sharded (ZeRO-3 / FSDP) weights collectively.
    """
    out = Path(recipe.output.dir)
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    written: dict[str, str] = {}
    if accelerator.is_main_process:
        if isinstance(unwrapped, PeftModel):
            unwrapped.save_pretrained(out / "adapter", state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(out / "adapter")
            written["adapter"] = str(out / "adapter")
            if recipe.lora.merge_on_save:
                unwrapped.load_state_dict(state_dict)
                merged = unwrapped.merge_and_unload()
                save_full_model(merged, merged.state_dict(), tokenizer, out / "model")
                written["model"] = str(out / "model")
        else:
            save_full_model(unwrapped, state_dict, tokenizer, out / "model")
            written["model"] = str(out / "model")
    accelerator.wait_for_everyone()
    return written


def save_full_model(model: torch.nn.Module, state_dict: dict, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)
