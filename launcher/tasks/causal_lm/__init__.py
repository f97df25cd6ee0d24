"""`task.type: causal_lm`: SFT of a decoder's own LM head (chat, prompt_completion and labelled rows)."""
