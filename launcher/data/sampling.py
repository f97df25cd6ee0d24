"""Training orders that batch similar lengths together without sorting the labels into separate batches.

Plain length grouping (transformers' `get_length_grouped_indices`, the Trainer's `group_by_length`) shuffles, then
sorts megabatches of up to 50 batches by length. Where length says something about the label (short messages whose
positive class is longer), that sort is also a sort by label: the minority class gathers in the few longest batches
of each megabatch and most batches hold none of it (47 of 75 batches on 600 real messages against 22 of 75 in random
order; 52 of 75 against 30 on tests/unit/test_sampling.py's synthetic set). Shuffling the batches afterwards does not
change what they hold, and smaller sort windows do not help: a window of 2 batches still sorts the pair by label.
Every majority-only batch pulls all predictions towards the majority class, and there are more of them than of any
other kind of step; a decoder LoRA run ended predicting that class only, where the same runs without grouping learned.

`label_mixed_length_grouped_order` keeps the label mix in every batch (each class's share, rounded down or up) and
groups lengths within each class: batch k of a megabatch holds the k-th shortest slice of every class. Where length
predicts the label every batch then pads to its long minority example, which is the price of the mix (synthetic
set: 42% padding against 4.5% for plain grouping and 50% in random order; SMS-like messages where every spam is
longer than every ham: 54% against 8% and 50%, so no saving over random order there); where length does not
predict the label, it pads about as little as plain grouping (5.4% against 4.4%).

`EpochShuffleSampler` is the training order the loaders use: seeded by (seed, epoch) alone, so every rank and
every resume replays it, plain, length-grouped, or length-grouped with the label mix.

Orders are NumPy arrays over NumPy lengths and labels: at 650,000 rows Python lists of them held about 70 MB more
than the arrays do. The loops that remain run once per batch or per megabatch, not per example, and every random
draw is the same torch draw as before, so an order is the same whatever held it (tests/unit/test_sampling.py
checks recorded orders).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

MEGABATCH_BATCHES = 50  # as transformers' grouping: long enough runs to sort, shuffled anew every epoch
YIELD_CHUNK = 8_192
"""Indices become Python ints this many at a time: the epoch's order stays one NumPy array."""


def randperm(n: int, generator: torch.Generator) -> np.ndarray:
    return torch.randperm(n, generator=generator).numpy()


def spread_classes(order: np.ndarray, labels: np.ndarray, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """`order` re-laid so that every run of `batch_size` positions (every batch) holds each class in proportion to its
    size: the floor of its share, or one more. The extra seats of a batch go to the classes furthest behind their
    share so far (ties in a random order), so the shares hold over the whole epoch too; each class keeps its order.
    Classes are taken in the order of their first example in `order`."""
    ordered_labels = labels[order]
    values, first = np.unique(ordered_labels, return_index=True)
    members = [order[ordered_labels == value] for value in values[np.argsort(first)]]
    shares = [batch_size * len(queue) / len(order) for queue in members]
    tie_break = torch.rand(len(members), generator=generator).tolist()
    behind = [0.0] * len(members)  # examples each class is owed so far
    taken = [0] * len(members)  # examples of each class laid out so far
    laid_out = np.empty(len(order), dtype=order.dtype)
    position = 0
    while position < len(order):
        seats = min(batch_size, len(order) - position)
        behind = [owed + share for owed, share in zip(behind, shares)]
        left = [len(queue) - done for queue, done in zip(members, taken)]
        take = [min(int(share), remaining) for share, remaining in zip(shares, left)]
        while sum(take) < seats:
            open_classes = [c for c, remaining in enumerate(left) if take[c] < remaining]
            # one extra seat per class and batch, unless the classes still open have no other members left
            below_share = [c for c in open_classes if take[c] < math.ceil(shares[c])] or open_classes
            take[max(below_share, key=lambda c: (behind[c] - take[c], tie_break[c]))] += 1
        for c, count in enumerate(take):
            behind[c] -= count
            laid_out[position:position + count] = members[c][taken[c]:taken[c] + count]
            taken[c] += count
            position += count
    return laid_out


def sort_within_classes(block: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`block` with each class's examples sorted by length over the positions that class holds (stable: equal
    lengths keep their shuffled order)."""
    result = block.copy()
    block_labels = labels[block]
    for label in np.unique(block_labels):
        slots = np.flatnonzero(block_labels == label)
        result[slots] = block[slots][np.argsort(lengths[block[slots]], kind="stable")]
    return result


def batches_in_random_order(order: np.ndarray, lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """`order` cut into batches, shuffled so that no length curriculum runs through the epoch. The full batch with the
    longest example comes first, so an out-of-memory shows at the first step; a short last batch stays last, since
    the loader cuts batches from this order in runs of `batch_size`."""
    starts = np.arange(0, len(order), batch_size)
    if len(starts) == 1:  # one batch: nothing to shuffle, but the same draw as for more
        randperm(0, generator)
        return order
    full = len(order) // batch_size
    longest = np.maximum.reduceat(lengths[order], starts)[:full]
    first = int(np.argmax(longest))  # the first batch of the longest length, as Python's max() picks
    rest = np.delete(np.arange(full), first)
    chosen = np.concatenate([[first], rest[randperm(len(rest), generator)]])
    return np.concatenate([order[:full * batch_size].reshape(full, batch_size)[chosen].ravel(), order[full * batch_size:]])


def label_mixed_length_grouped_order(
    lengths: Sequence[int], labels: Sequence[int], batch_size: int, generator: torch.Generator,
    megabatch_batches: int = MEGABATCH_BATCHES,
) -> np.ndarray:
    """A training order of similar-length batches in which every batch keeps the label mix of the whole set.

    Shuffle, spread the classes evenly along the order (`spread_classes`), cut megabatches of `megabatch_batches`
    batches, sort each class by length inside its own positions of each megabatch (`sort_within_classes`), then
    shuffle the batches (`batches_in_random_order`). Depends only on `generator`: every rank gets the same order
    and a resumed run replays it.
    """
    lengths, labels = np.asarray(lengths), np.asarray(labels)
    order = spread_classes(randperm(len(lengths), generator), labels, batch_size, generator)
    size = megabatch_batches * batch_size
    grouped = np.concatenate([sort_within_classes(order[start:start + size], lengths, labels)
                              for start in range(0, len(order), size)])
    return batches_in_random_order(grouped, lengths, batch_size, generator)


def length_grouped_indices(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """transformers' `get_length_grouped_indices` (the Trainer's `group_by_length`) over NumPy, draw for draw:
    shuffle, sort megabatches of up to 50 batches by length, longest first, and swap the longest example of all
    to the very front."""
    multiple = max(1, min(len(lengths) // (batch_size * 4), MEGABATCH_BATCHES))
    lengths = lengths.astype(np.int64)  # negated below: no unsigned wrap-around
    indices = randperm(len(lengths), generator)
    size = multiple * batch_size
    megabatches = [block[np.argsort(-lengths[block], kind="stable")]
                   for block in (indices[start:start + size] for start in range(0, len(indices), size))]
    longest = int(np.argmax([lengths[block[0]] for block in megabatches]))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return np.concatenate(megabatches)


def length_grouped_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> np.ndarray:
    """Batches of similar lengths, in random order.

    transformers' grouping shuffles, cuts the order into megabatches and sorts each by length, so its batches run
    from longest to shortest within every megabatch: the same length curriculum each epoch. On the demo that cost
    0.03 accuracy after one epoch, averaged over seeds (docs/benchmarks.md), so the batches are shuffled as well.
    The batch holding the longest example stays first, so an out-of-memory shows at the first step, and a short
    last batch stays last, since the loader cuts batches from this order in runs of `batch_size`.
    """
    lengths = np.asarray(lengths)
    return batches_in_random_order(length_grouped_indices(lengths, batch_size, generator), lengths, batch_size, generator)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch) alone, so every rank sees the same order and a resumed
    run replays it exactly. With `lengths`, batches group similar lengths (`length_grouped_order`); with `labels`
    too, every batch keeps the label mix (`launcher.data.sampling`: plain grouping sorts labels into separate batches
    wherever length predicts the label)."""

    def __init__(self, num_examples: int, seed: int, batch_size: int, lengths: Optional[Sequence[int]] = None,
                 labels: Optional[Sequence[int]] = None):
        self.num_examples = num_examples
        self.seed = seed
        self.batch_size = batch_size
        self.lengths = lengths
        self.labels = labels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.lengths is None:
            order = randperm(self.num_examples, generator)
        elif self.labels is not None:
            order = label_mixed_length_grouped_order(self.lengths, self.labels, self.batch_size, generator)
        else:
            order = length_grouped_order(self.lengths, self.batch_size, generator)
        for start in range(0, len(order), YIELD_CHUNK):
            yield from order[start:start + YIELD_CHUNK].tolist()
