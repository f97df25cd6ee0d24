"""Reading a batch whatever its layout (padded rows with an attention mask, or one packed row)."""

from __future__ import annotations


import torch



def example_token_ids(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each example's tokens without padding, from a padded batch (rows and attention mask) or a packed one."""
    if "attention_mask" in batch:
        return [ids[row.bool()] for ids, row in zip(batch["input_ids"], batch["attention_mask"])]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    return list(batch["input_ids"][0].tensor_split(starts[1:]))


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many of the batch's tokens are not padding (a packed row has none)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel())
