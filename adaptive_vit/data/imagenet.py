"""``imagenet``: ``root/train/<wnid>/<image>.JPEG`` and ``root/val/<wnid>/<image>.JPEG``.

The validation images must be sorted into the 1000 class folders; ``val`` is also the test
split. Everything else (hidden folders, ``val_split``, the checks of the layout) is as for
:class:`~adaptive_vit.data.folder.FolderSource`.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from adaptive_vit.data.folder import FolderSource
from adaptive_vit.data.source import Transform


class ImageNetSource(FolderSource):
    """ImageNet-1k as class folders: exactly 1000 classes, tested on ``val``."""

    @property
    def num_classes(self) -> int:
        return 1000

    def build(self, split: str, transform: Transform) -> Dataset:
        found = len(self.class_names)
        if found != self.num_classes:
            raise ValueError(
                f"dataset {self.name!r} expects {self.num_classes} class folders in "
                f"{self.root / 'train'}, found {found}; use `dataset: folder` for other class sets"
            )
        return super().build(split, transform)

    def test_folder(self) -> str:
        return "val"
