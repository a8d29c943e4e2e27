"""Image files in class folders: finding them, decoding them, and what happens when one fails.

An image that fails to decode is reported once (per process) with an
:class:`UnreadableImageWarning` naming the file, and the next sample is returned in its place.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torchvision.datasets import ImageFolder

from adaptive_vit.data.source import Transform

_MAX_SUBSTITUTES = 32  # consecutive unreadable files tolerated before giving up


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded."""


def class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``split_dir``.

    Args:
        split_dir: the folder of one split.
    """
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


class ClassFolderImages(ImageFolder):
    """An :class:`ImageFolder` with a fixed class list that skips unreadable images.

    ``classes`` fixes the label of every class folder, so all splits share one mapping. An
    image that fails to decode is reported once (per process) and replaced by the next sample.

    Args:
        root: the split's folder, holding one sub-folder per class.
        classes: the class folder names, in label order.
        transform: the transform of every image.
    """

    def __init__(self, root: Path, classes: list[str], transform: Transform) -> None:
        self._fixed_classes = classes
        self._reported: set[str] = set()
        super().__init__(str(root), transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {name: i for i, name in enumerate(self._fixed_classes)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(_MAX_SUBSTITUTES):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except (UnidentifiedImageError, OSError) as error:
                self._report_unreadable(path, error)
                continue
            return self.transform(image), target
        raise RuntimeError(
            f"{_MAX_SUBSTITUTES} consecutive unreadable images starting at "
            f"{self.samples[index][0]}; check the files under {self.root}"
        )

    def _report_unreadable(self, path: str, error: Exception) -> None:
        if path not in self._reported:
            self._reported.add(path)
            warnings.warn(
                f"skipping unreadable image {path} ({error}); using the next sample instead",
                UnreadableImageWarning,
                stacklevel=2,
            )
