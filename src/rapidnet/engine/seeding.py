"""Reproducible randomness that survives interruption: per-epoch sample order and per-sample / per-step seeds.

Exact ``--resume`` from the middle of an epoch needs every random draw after the resume point to be what the
uninterrupted run drew. Instead of hoping that saved RNG states line up with DataLoader workers' prefetching, each
random choice is a pure function of a few integers:

- the order of an epoch depends on ``(seed, epoch)``;
- a sample's augmentation depends on ``(seed, epoch, global position in the epoch)`` (``SeededDataset`` reseeds
  ``random``/numpy/torch right before transforming it, in whichever process loads it);
- a training step's dropout, stochastic depth and Mixup draws depend on ``(seed, epoch, step, rank)``
  (``seed_step``).

So a run restarted at step *k* sees exactly the batches and draws of an uninterrupted run, with any number of
workers. The global position also makes the split over *N* processes equal, batch for batch, to one process with an
*N* times larger batch.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, Sampler

__all__ = [
    "SeededDataset",
    "SeededSampler",
    "ignore_sigint",
    "mix_seed",
    "seed_everything",
    "seed_step",
]

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from several integers (numpy ``SeedSequence``), e.g. ``mix_seed(seed, epoch)``."""
    entropy = [int(p) & _MASK64 for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int, cuda: bool = True) -> None:
    """Seed python, numpy and torch (CPU, and CUDA when ``cuda``) from one integer."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.random.default_generator.manual_seed(seed)


def seed_step(seed: int, epoch: int, step: int, rank: int = 0) -> None:
    """Seed everything for one training step (dropout, stochastic depth, Mixup) from its coordinates."""
    seed_everything(mix_seed(seed, epoch, step, rank, 1))


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group, but only the trainer should handle it.

    A worker killed by SIGINT while the trainer waits for its batch would turn a clean stop into a crash.
    """

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SeededDataset(Dataset):
    """A data set (or a subset of it) whose items, asked for as ``(index, seed)``, are transformed under that seed.

    Reseeding costs a few microseconds per sample and makes augmentation independent of which worker loads a sample
    and of how far ahead workers prefetch.
    """

    def __init__(self, dataset: Any, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(indices) if indices is not None else None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if isinstance(item, tuple):
            index, seed = item
            seed_everything(seed, cuda=False)
        else:
            index = item
        return self.dataset[self.indices[index] if self.indices is not None else index]


class SeededSampler(Sampler):
    """One process's share of an epoch as ``(index, sample_seed)`` pairs, whole batches only, from any batch on.

    Order: a permutation drawn from ``(seed, epoch)``; with ``repeats > 1`` (repeated augmentation, for several
    processes) timm's ``RepeatAugSampler`` makes the order instead. Process ``rank`` takes positions
    ``rank, rank + world_size, ...``, so the global batch *b* holds the same samples whatever the process count.
    ``set_epoch(epoch, start_batch)`` chooses the epoch and the first batch to yield (for resuming mid-epoch).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        repeats: int = 1,
    ) -> None:
        self.length = length
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.repeats = repeats
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_order(self) -> list[int]:
        """This process's indices for the current epoch (whole batches only), before ``start_batch`` is applied."""
        if self.repeats > 1:
            ra = RepeatAugSampler(
                range(self.length),
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=self.shuffle,
                num_repeats=self.repeats,
            )
            ra.set_epoch(mix_seed(self.seed, self.epoch, 2) & 0x7FFFFFFF)
            mine = list(iter(ra))
        else:
            if self.shuffle:
                generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 2))
                order = torch.randperm(self.length, generator=generator).tolist()
            else:
                order = list(range(self.length))
            mine = order[self.rank :: self.world_size][: self.length // self.world_size]
        return mine[: self.num_batches_from(len(mine)) * self.batch_size]

    def num_batches_from(self, count: int) -> int:
        return count // self.batch_size

    @property
    def num_batches(self) -> int:
        """Full batches per epoch for this process (equal on every process)."""
        if self.repeats > 1:
            count = len(RepeatAugSampler(range(self.length), self.world_size, self.rank, num_repeats=self.repeats))
        else:
            count = self.length // self.world_size
        return self.num_batches_from(count)

    def seeds_for(self, position: int) -> int:
        """Augmentation seed of this process's ``position``-th sample of the epoch (a global-position function)."""
        return mix_seed(self.seed, self.epoch, position * self.world_size + self.rank, 3)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        start = self.start_batch * self.batch_size
        for position in range(start, len(order)):
            yield order[position], self.seeds_for(position)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch) * self.batch_size
