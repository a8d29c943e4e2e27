"""Image files in class folders: finding them, decoding them, and what happens when one fails.

A file is taken as an image when Pillow opens files with its extension
(:data:`IMAGE_EXTENSIONS`, from ``PIL.Image.registered_extensions()``): opening 1.28 M ImageNet
files at start-up to look would be too slow. The other files of a split (no extension, ``.txt``
...) are counted in one :class:`SkippedFilesWarning` with a few examples, never dropped silently.
Every image is decoded to 8-bit RGB (:func:`load_rgb`): 16-bit grayscale (PNG, TIFF) is scaled
to 8 bit; a mode with no known value range (32-bit integer or float) is not guessed at.
An image that fails to decode is reported once (per process) with an
:class:`UnreadableImageWarning` naming the file, and its sample is ``None``: evaluation loaders
(:class:`ReadableBatches`) leave it out, so that every process counts exactly the images it
read; training puts another image in its place (:class:`~adaptive_vit.data.sampler.TrainingSamples`).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from adaptive_vit.data.source import Transform

# the extensions of the formats Pillow can open (not those it can only write, such as .pdf)
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
_EXAMPLES = 3  # example paths per reason in a SkippedFilesWarning
_16_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})  # unsigned 16-bit grayscale
# modes Pillow converts to RGB without losing their meaning (8 bits a channel, or fewer)
_8_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                          "YCbCr", "LAB", "HSV"})


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded."""


class SkippedFilesWarning(UserWarning):
    """Files in a split's class folders that were not taken as images."""


class ImageModeError(ValueError):
    """An image whose pixel values cannot be mapped to 8-bit RGB faithfully."""


def load_rgb(path: str) -> Image.Image:
    """The image file ``path`` as 8-bit RGB.

    16-bit grayscale is scaled (0..65535 to 0..255; Pillow's own conversion would clip every
    value above 255 to white); the 8-bit modes are converted by Pillow.

    Args:
        path: the image file.

    Raises:
        OSError: the file is missing, truncated or not an image Pillow can decode.
        ImageModeError: the image's mode has no known value range (e.g. 32-bit integer ``I``
            or float ``F``), so no conversion to 8 bit would be faithful.
    """
    with Image.open(path) as image:
        if image.mode in _16_BIT_MODES:
            pixels = np.asarray(image).astype(np.float32) / 257  # 65535 / 257 = 255
            return Image.fromarray(pixels.round().astype(np.uint8)).convert("RGB")
        if image.mode not in _8_BIT_MODES:
            raise ImageModeError(
                f"mode {image.mode} has no known value range; save it with 8 or 16 bits a channel"
            )
        return image.convert("RGB")


def find_images(split_dir: Path, classes: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """The image files under each class folder of ``split_dir``, and the other files.

    Sub-folders of a class folder are searched too (links followed), in sorted order.

    Args:
        split_dir: the folder of one split.
        classes: the class folder names, in label order.

    Returns:
        ``(path, label)`` of every file with an extension in :data:`IMAGE_EXTENSIONS`, and the
        paths of all other files.
    """
    images, others = [], []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(split_dir / name, followlinks=True)):
            for file in sorted(files):
                path = os.path.join(folder, file)
                if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                    images.append((path, label))
                else:
                    others.append(path)
    return images, others


def report_skipped(split_dir: Path, paths: list[str]) -> None:
    """One :class:`SkippedFilesWarning` counting the files of a split not taken, by extension.

    Args:
        split_dir: the folder of the split.
        paths: the files not taken.
    """
    if not paths:
        return
    by_reason: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        suffix = os.path.splitext(path)[1].lower()
        by_reason[f"{suffix!r}" if suffix else "without an extension"].append(path)
    reasons = [
        f"{len(group)} {reason} ({', '.join(os.path.relpath(p, split_dir) for p in group[:_EXAMPLES])}"
        f"{', ...' if len(group) > _EXAMPLES else ''})"
        for reason, group in sorted(by_reason.items(), key=lambda item: -len(item[1]))
    ]
    warnings.warn(
        f"{split_dir}: {len(paths)} file(s) not taken as images, as Pillow opens no file with their "
        f"extension: {'; '.join(reasons)}. Give the images among them an image extension (.png, .jpg, ...).",
        SkippedFilesWarning,
        stacklevel=3,
    )


class ClassFolderImages(Dataset):
    """The image files of one split's class folders, with a fixed class list.

    ``classes`` fixes the label of every class folder, so all splits share one mapping. The
    files that are not taken as images are reported (:func:`report_skipped`). An image that
    fails to decode is reported once (per process) and its sample is ``None``.

    Args:
        root: the split's folder, holding one sub-folder per class.
        classes: the class folder names, in label order.
        transform: the transform of every image.
    """

    def __init__(self, root: Path, classes: list[str], transform: Transform) -> None:
        self.root = str(root)
        self.classes = classes
        self.transform = transform
        self.samples, skipped = find_images(root, classes)
        self.targets = [label for _, label in self.samples]
        self._reported: set[str] = set()
        report_skipped(root, skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        """``(transform(image), label)``, or ``None`` when the file cannot be read as an image."""
        path, target = self.samples[index]
        try:
            image = load_rgb(path)
        except (OSError, ImageModeError) as error:
            if path not in self._reported:
                self._reported.add(path)
                warnings.warn(f"skipping unreadable image {path} ({error})", UnreadableImageWarning, stacklevel=2)
            return None
        return self.transform(image), target


def collate_readable(samples: list[Any]) -> Any:
    """The batch of the samples that are not ``None`` (unreadable), or ``None`` if none is left.

    Args:
        samples: a batch's samples, ``None`` for each unreadable image.
    """
    readable = [sample for sample in samples if sample is not None]
    return default_collate(readable) if readable else None


class ReadableBatches(DataLoader):
    """A loader whose batches hold only the images that could be read.

    Use it with ``collate_fn=collate_readable``: a batch leaves its unreadable images out, and a
    batch that had nothing else is not yielded at all, so a step never receives an empty batch.
    """

    def __iter__(self) -> Iterator[Any]:
        return (batch for batch in super().__iter__() if batch is not None)
