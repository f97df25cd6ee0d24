"""Preference tuning: `task.type: reward` (a reward model) and `task.type: dpo` (direct preference optimization),
with what they share (reading and tokenizing pairs, pair batches)."""
