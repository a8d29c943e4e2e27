"""``cifar10`` / ``cifar100``: torchvision's python-version archives under ``root``.

By default the official test set is both the validation and the test split; ``val_split > 0``
instead holds out that fraction of the training set (stratified, seeded by ``seed``) for
validation. The archives are downloaded only when the user sets ``download``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from adaptive_vit.data.source import DataSource, Transform


class CifarSource(DataSource):
    """CIFAR in torchvision's format; subclasses name the torchvision dataset and the statistics."""

    dataset_class: ClassVar[type[CIFAR10]]
    classes: ClassVar[int]
    crop_pct = 1.0  # the objects fill the 32x32 frame

    @property
    def num_classes(self) -> int:
        return self.classes

    @property
    def class_names(self) -> list[str]:
        """The class names stored in the archive's meta file."""
        meta = self._folder() / self.dataset_class.meta["filename"]
        if not meta.is_file():
            raise self._missing()
        with meta.open("rb") as file:
            return pickle.load(file, encoding="latin1")[self.dataset_class.meta["key"]]

    def prepare(self) -> None:
        """Download both archives into ``root`` when ``download`` is set."""
        if self.download:
            for train in (True, False):
                self.dataset_class(str(self.root), train=train, download=True)

    def build(self, split: str, transform: Transform) -> Dataset:
        from_train_set = split == "train" or (split == "val" and self.val_split > 0)
        try:
            dataset = self.dataset_class(str(self.root), train=from_train_set, transform=transform)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
            raise self._missing() from error
        return self.hold_out(dataset, split) if from_train_set and self.val_split > 0 else dataset

    def _folder(self) -> Path:
        """The archive's folder under ``root``."""
        return self.root / self.dataset_class.base_folder

    def _missing(self) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.name} files not found or incomplete in {self._folder()}; set `download: true` "
            f"in the data config to download them into {self.root}, or place the extracted "
            "python-version archive there"
        )


class Cifar10Source(CifarSource):
    """CIFAR-10."""

    dataset_class = CIFAR10
    classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class Cifar100Source(CifarSource):
    """CIFAR-100."""

    dataset_class = CIFAR100
    classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
