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
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import Hashable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

MEGABATCH_BATCHES = 50  # as transformers' grouping: long enough runs to sort, shuffled anew every epoch


def spread_classes(order: Sequence[int], labels: Sequence[Hashable], batch_size: int, generator: torch.Generator) -> list[int]:
    """`order` re-laid so that every run of `batch_size` positions (every batch) holds each class in proportion to its
    size: the floor of its share, or one more. The extra seats of a batch go to the classes furthest behind their
    share so far (ties in a random order), so the shares hold over the whole epoch too; each class keeps its order."""
    by_class: dict[Hashable, list[int]] = defaultdict(list)
    for index in order:
        by_class[labels[index]].append(index)
    queues = [deque(members) for members in by_class.values()]
    shares = [batch_size * len(queue) / len(order) for queue in queues]
    tie_break = torch.rand(len(queues), generator=generator).tolist()
    behind = [0.0] * len(queues)  # examples each class is owed so far
    laid_out: list[int] = []
    while len(laid_out) < len(order):
        seats = min(batch_size, len(order) - len(laid_out))
        behind = [owed + share for owed, share in zip(behind, shares)]
        take = [min(int(share), len(queue)) for share, queue in zip(shares, queues)]
        while sum(take) < seats:
            open_classes = [c for c, queue in enumerate(queues) if take[c] < len(queue)]
            # one extra seat per class and batch, unless the classes still open have no other members left
            below_share = [c for c in open_classes if take[c] < math.ceil(shares[c])] or open_classes
            take[max(below_share, key=lambda c: (behind[c] - take[c], tie_break[c]))] += 1
        for c, count in enumerate(take):
            behind[c] -= count
            laid_out += [queues[c].popleft() for _ in range(count)]
    return laid_out


def sort_within_classes(block: Sequence[int], lengths: Sequence[int], labels: Sequence[Hashable]) -> list[int]:
    """`block` with each class's examples sorted by length over the positions that class holds (stable: equal
    lengths keep their shuffled order)."""
    result = list(block)
    for label in {labels[index] for index in block}:
        slots = [position for position, index in enumerate(block) if labels[index] == label]
        for slot, index in zip(slots, sorted((block[s] for s in slots), key=lambda i: lengths[i])):
            result[slot] = index
    return result


def batches_in_random_order(order: Sequence[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """`order` cut into batches, shuffled so that no length curriculum runs through the epoch. The full batch with the
    longest example comes first, so an out-of-memory shows at the first step; a short last batch stays last, since
    the loader cuts batches from this order in runs of `batch_size`."""
    batches = [list(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]
    short_last = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < batch_size else []
    first = batches.pop(max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b])))
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [index for batch in (first, *shuffled, *short_last) for index in batch]


def label_mixed_length_grouped_order(
    lengths: Sequence[int], labels: Sequence[Hashable], batch_size: int, generator: torch.Generator,
    megabatch_batches: int = MEGABATCH_BATCHES,
) -> list[int]:
    """A training order of similar-length batches in which every batch keeps the label mix of the whole set.

    Shuffle, spread the classes evenly along the order (`spread_classes`), cut megabatches of `megabatch_batches`
    batches, sort each class by length inside its own positions of each megabatch (`sort_within_classes`), then
    shuffle the batches (`batches_in_random_order`). Depends only on `generator`: every rank gets the same order
    and a resumed run replays it.
    """
    order = spread_classes(torch.randperm(len(lengths), generator=generator).tolist(), labels, batch_size, generator)
    size = megabatch_batches * batch_size
    grouped = [i for start in range(0, len(order), size) for i in sort_within_classes(order[start:start + size], lengths, labels)]
    return batches_in_random_order(grouped, lengths, batch_size, generator)


def length_grouped_order(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """Batches of similar lengths, in random order.

    transformers' grouping (the Trainer's `group_by_length`) shuffles, cuts the order into megabatches and sorts
    each by length, so its batches run from longest to shortest within every megabatch: the same length
    curriculum each epoch. On the demo that cost 0.03 accuracy after one epoch, averaged over seeds
    (docs/benchmarks.md), so the batches are shuffled as well. The batch holding the longest example stays first,
    so an out-of-memory shows at the first step, and a short last batch stays last, since the loader cuts batches
    from this order in runs of `batch_size`.
    """
    return batches_in_random_order(get_length_grouped_indices(lengths, batch_size, generator=generator), lengths,
                                   batch_size, generator)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch) alone, so every rank sees the same order and a resumed
    run replays it exactly. With `lengths`, batches group similar lengths (`length_grouped_order`); with `labels`
    too, every batch keeps the label mix (`launcher.data.sampling`: plain grouping sorts labels into separate batches
    wherever length predicts the label)."""

    def __init__(self, num_examples: int, seed: int, batch_size: int, lengths: Optional[list[int]] = None,
                 labels: Optional[list[int]] = None):
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
            yield from torch.randperm(self.num_examples, generator=generator).tolist()
        elif self.labels is not None:
            yield from label_mixed_length_grouped_order(self.lengths, self.labels, self.batch_size, generator)
        else:
            yield from length_grouped_order(self.lengths, self.batch_size, generator)
