"""What one data set contributes to :class:`~adaptive_vit.data.ImageDataModule`: :class:`DataSource`.

A source owns everything that differs between data sets (where the files are and what they
look like, the classes, the normalisation statistics, the eval crop, the default augmentation
geometry, how the train/val/test splits are made), so the data module needs no checks of the
data set's name. Sources are registered by name in :mod:`adaptive_vit.data.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset

Transform = Callable[[Image.Image], torch.Tensor]
Stats = tuple[float, float, float]

SPLITS = ("train", "val", "test")


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices class by class into ``[rest, part_1, ..., part_k]``.

    Part ``i`` takes ``round(fractions[i] * class_size)`` samples of every class; ``rest`` takes
    the remainder. The result depends only on ``labels``, ``fractions`` and ``seed``.

    Args:
        labels: the label of every sample.
        fractions: the fraction of every class that goes to each held-out part.
        seed: seed of the shuffle inside each class.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        *held_out, rest = np.split(members, np.cumsum([round(len(members) * f) for f in fractions]))
        for part, chunk in zip(parts, [rest, *held_out]):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) for part in parts]


def stratified_subset(dataset: Any, fractions: Sequence[float], seed: int, split: str) -> Subset:
    """The part of :func:`stratified_split` that makes ``split`` of a dataset with ``targets``.

    Args:
        dataset: a dataset with a ``targets`` list.
        fractions: the held-out fractions, in :data:`SPLITS` order after ``train`` (the rest).
        seed: seed of the split.
        split: ``train`` (the rest), ``val`` or ``test``.
    """
    indices = stratified_split(np.asarray(dataset.targets), fractions, seed)[SPLITS.index(split)]
    return Subset(dataset, indices.tolist())


class DataSource(ABC):
    """One data set: its classes, normalisation, eval crop, augmentation geometry and splits.

    Subclasses set the class attributes that differ from ImageNet's and implement
    :attr:`num_classes`, :attr:`class_names` and :meth:`build`; :meth:`prepare` may download.
    Only what is cheap may be read in ``__init__`` (the data module asks for :attr:`num_classes`
    right away); the images are read in :meth:`build`.

    Args:
        name: the ``dataset`` name the source was chosen by (used in messages).
        root: the data set's directory; ``None`` only for sources with ``needs_root = False``.
        val_split: fraction of the training set held out (stratified, seeded) as the
            validation split, for the sources that honour it; ``0`` keeps the official splits.
        seed: seed of the ``val_split`` hold-out.
        download: whether :meth:`prepare` may download missing files.
    """

    mean: ClassVar[Stats] = IMAGENET_DEFAULT_MEAN
    std: ClassVar[Stats] = IMAGENET_DEFAULT_STD
    crop_pct: ClassVar[float] = 0.875  # eval resize to img_size / crop_pct, then centre crop
    train_scale: ClassVar[tuple[float, float]] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: ClassVar[float] = 0.5  # training flip probability
    needs_root: ClassVar[bool] = True

    def __init__(self, name: str, root: str | Path | None, val_split: float = 0.0, seed: int = 0,
                 download: bool = False) -> None:
        if self.needs_root and root is None:
            raise ValueError(f"dataset {name!r} needs `root` (the dataset directory)")
        self.name = name
        self.root = Path(root) if root is not None else None
        self.val_split = val_split
        self.seed = seed
        self.download = download

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes (known right after ``__init__``)."""

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Class names in label order."""

    def prepare(self) -> None:
        """Fetch what is missing, when the user asked for it (once per node); nothing by default."""

    @abstractmethod
    def build(self, split: str, transform: Transform) -> Dataset:
        """The dataset of one split, yielding ``(transform(image), label)``.

        Args:
            split: one of :data:`SPLITS`.
            transform: the transform of every image (training or evaluation).
        """

    def hold_out(self, dataset: Any, split: str) -> Subset:
        """``split`` (``train`` or ``val``) of a training set that ``val_split`` divides.

        Args:
            dataset: the whole training set (a dataset with a ``targets`` list).
            split: ``train`` for the rest, ``val`` for the held-out part.
        """
        return stratified_subset(dataset, (self.val_split,), self.seed, split)
