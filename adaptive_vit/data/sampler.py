"""The training order and the seeds of each image's augmentation.

Training randomness is seeded, not streamed: the order of each epoch comes from the run's seed
and the epoch (:class:`ResumableSampler`), each image's augmentation from its own seed
(:class:`TrainingSamples`). Batches therefore do not depend on the number of loader workers, and
a fit resumed from a mid-epoch checkpoint continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from adaptive_vit.data.images import UnreadableImageWarning

_MAX_SUBSTITUTES = 32  # consecutive unreadable training images tolerated before giving up


def mix_seeds(*parts: int) -> int:
    """One seed in [0, 2**62) from several integers (order matters).

    Args:
        parts: the integers, e.g. (run seed, epoch, batch, rank).
    """
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % 2**62
    return seed


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the torch (CPU), numpy and python RNGs seeded by ``seed``, then put their
    previous states back: the block neither depends on nor advances the global streams.

    Args:
        seed: the seed of the block's random draws.
    """
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds CUDA too
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


class TrainingSamples(Dataset):
    """Training samples whose augmentation draws from their own seed, never an unreadable one.

    Items are ``(index, seed)`` pairs from :class:`ResumableSampler`: an image's random crop,
    flip, RandAugment and erasing depend only on the run's seed, the epoch and the image, not
    on the worker that loads it, the number of workers, or what was loaded before. That is what
    lets an interrupted run continue with bit-identical batches.

    An unreadable image (a ``None`` sample) is replaced by the next readable training sample,
    which keeps batches full; this is said once per process (each file is named by the dataset).

    Args:
        dataset: the training dataset.
    """

    def __init__(self, dataset: Dataset) -> None:
        self._wrapped = dataset
        self._substituted = False

    def __len__(self) -> int:
        return len(self._wrapped)

    def __getattr__(self, name: str) -> Any:  # `samples`, `indices`, `dataset`... of the wrapped one
        # not `__getitems__` (batched fetching would bypass the seeds), nor `_wrapped` itself
        # (not set yet while unpickling in a worker)
        if name.startswith("__") or name == "_wrapped":
            raise AttributeError(name)
        return getattr(self._wrapped, name)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        """``dataset[index]``, or ``dataset[(index, seed)]`` with its own seed; when that image is
        unreadable, the next readable one (with the same seed)."""
        index, seed = (item, None) if isinstance(item, int) else item
        for offset in range(_MAX_SUBSTITUTES):
            with nullcontext() if seed is None else seeded(seed):
                sample = self._wrapped[(index + offset) % len(self)]
            if sample is not None:
                if offset and not self._substituted:
                    self._substituted = True
                    warnings.warn("training takes the next readable image in place of an unreadable one",
                                  UnreadableImageWarning, stacklevel=2)
                return sample
        raise RuntimeError(f"{_MAX_SUBSTITUTES} consecutive unreadable training images from index {index}; "
                           "check the image files (each was named in a warning)")


class ResumableSampler(DistributedSampler):
    """The training order: a shuffle of (seed, epoch) that can start mid-epoch.

    Yields ``(index, sample_seed)`` pairs for :class:`TrainingSamples`. Each epoch's order and
    per-image seeds come from a generator seeded with ``seed + epoch`` (Lightning calls
    :meth:`set_epoch`), so they never touch the global RNG. Under DDP each rank takes every
    ``num_replicas``-th image of the padded order, as :class:`DistributedSampler` does (being
    one, Lightning does not replace it).

    A run resumed from a mid-epoch checkpoint skips the ``start`` images this rank had already
    trained on in that epoch (:meth:`resume_at`). The position comes from Lightning's count of
    completed batches, not from how far the loader had read ahead: Lightning prefetches a batch,
    so a loader's own "samples yielded" would skip one batch on resume.

    Args:
        dataset: the training dataset (only its length is used).
        num_replicas: number of DDP processes (1 without DDP).
        rank: this process's global rank.
        seed: seed of the order and of the per-image augmentation seeds.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, start: int) -> None:
        """Start epoch ``epoch`` at this rank's ``start``-th image (once).

        Args:
            epoch: the epoch to resume.
            start: how many of this rank's images of that epoch were already trained on.
        """
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()  # per image index
        padding = self.total_size - n
        order += (order * math.ceil(padding / n))[:padding] if padding > 0 else []
        shard = order[self.rank:self.total_size:self.num_replicas]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
            self._resume = None
        return iter([(i, seeds[i]) for i in shard[start:]])

