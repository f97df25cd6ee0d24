"""Tokenizer and model from the recipe (of the class its task names), optional LoRA, and the final export."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations import is_deepspeed_zero3_enabled

from launcher.distributed.library_messages import load_report_held, report_loading
from launcher.recipe.schema import LoraSection, ModelSection, Recipe

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


NO_LIMIT = int(1e29)  # transformers sets model_max_length to 1e30 (VERY_LARGE_INTEGER) where a tokenizer names none


class ModelError(ValueError):
    """The model cannot take what the recipe asks of it."""


def sequence_limits(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The longest sequences the model takes, as its config and its tokenizer say; a model without a position table
    (T5's relative positions) and a tokenizer without a limit say nothing. Both are kept: RoBERTa's tokenizer says
    2 less than its table, whose first rows belong to the padding."""
    limits = {}
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits["max_position_embeddings"] = int(positions)
    if tokenizer.model_max_length < NO_LIMIT:
        limits["tokenizer model_max_length"] = int(tokenizer.model_max_length)
    return limits


def check_max_length(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """`data.max_length` within what the model takes: beyond its position table the first long batch dies in the
    embeddings ("The size of tensor a (162) must match the size of tensor b (128)"), steps into the run."""
    config = AutoConfig.from_pretrained(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    limits = sequence_limits(config, tokenizer)
    if limits and recipe.data.max_length > min(limits.values()):
        listed = ", ".join(f"{name} {value}" for name, value in limits.items())
        raise ModelError(f"data.max_length {recipe.data.max_length} is longer than the model takes "
                         f"({recipe.model.name_or_path}: {listed}); set data.max_length to {min(limits.values())} or less")


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


def load_model(recipe: Recipe, task, tokenizer: PreTrainedTokenizerBase) -> tuple[torch.nn.Module, list[str]]:
    """The task's model class (`launcher.tasks`) with its arguments, the pad token, LoRA and the task's batches;
    and the plan's notes about loading.

    Under a ZeRO-3 Accelerator (built before this is called) `from_pretrained` loads inside `deepspeed.zero.Init`:
    each process materialises only its shard of the weights, never a full copy. The new head goes to the plan's
    notes instead of transformers' LOAD REPORT; weights missing from the backbone are still warned about.
    """
    spec = recipe.model
    with load_report_held():
        model, loading_info = task.model_class.from_pretrained(
            spec.name_or_path,
            **task.model_kwargs(),
            dtype=TORCH_DTYPES[spec.load_dtype],
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
            output_loading_info=True,
        )
    notes = [note for note in [report_loading(model, loading_info, spec.name_or_path)] if note]
    if is_deepspeed_zero3_enabled():
        keep_used_weight_conversions(model)
    # Decoder classifiers pick the last non-pad token; without pad_token_id they refuse batches > 1.
    model.config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.enabled:
        model = apply_lora(model, recipe.lora, task.peft_task_type)
        if is_deepspeed_zero3_enabled():
            match_adapter_dtype(model)
    task.adapt_model(model)
    return model, notes


def keep_used_weight_conversions(model: PreTrainedModel) -> None:
    """Forget the checkpoint key renamings that did not apply, as the non-ZeRO-3 loader does.

    transformers 5.23's ZeRO-3 loader keeps every candidate renaming (e.g. BERT's legacy `LayerNorm.gamma` ->
    `weight`), and `save_pretrained` reverts them all, so the exported file would name keys the source did not.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


def match_adapter_dtype(model: PeftModel) -> None:
    """Adapter dtype policy under ZeRO-3: trainable parameters take the dtype of the frozen base weights.

    ZeRO-3 flattens each parameter group into one buffer of one dtype, but peft creates the adapters in fp32
    after `zero.Init` already cast the base to bf16/fp16, and DeepSpeed asserts on the mix. Casting the
    adapters costs no update precision: DeepSpeed's bf16/fp16 optimizer keeps fp32 master copies of every
    trainable parameter and steps those, exactly as it does for a full fine-tune.
    """
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad]
    if frozen:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(frozen[0])


def apply_lora(model: torch.nn.Module, lora: LoraSection, task_type: TaskType) -> PeftModel:
    """peft LoRA; for sequence classification peft also trains and saves the new head (`classifier` / `score`)."""
    config = LoraConfig(
        task_type=task_type,
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
    """(trainable, total) parameter counts; ZeRO-3 shards report their full size (`ds_numel`), not their local 0."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trainable in sizes if trainable), sum(n for n, _ in sizes)


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
                merged = merged_replica(unwrapped, state_dict)
                save_full_model(merged, merged.state_dict(), tokenizer, out / "model")
                written["model"] = str(out / "model")
        else:
            save_full_model(unwrapped, state_dict, tokenizer, out / "model")
            written["model"] = str(out / "model")
    accelerator.wait_for_everyone()
    return written


def merged_replica(trained: PeftModel, state_dict: dict) -> PreTrainedModel:
    """The adapters merged into the base weights, built from the gathered state dict in a fresh CPU replica.

    The trained module itself cannot take the weights back under ZeRO-3 (its parameters are empty shards), so
    the replica is created on the meta device (no allocation, no random init) and takes the gathered tensors.
    """
    base = trained.get_base_model()
    with torch.device("meta"):
        replica = get_peft_model(type(base)(base.config), trained.peft_config[trained.active_adapter])
    replica.load_state_dict(state_dict, assign=True)
    return replica.merge_and_unload()


def save_full_model(model: torch.nn.Module, state_dict: dict, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)
