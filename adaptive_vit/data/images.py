"""Image files in class folders: finding them, decoding them, and what happens when one fails.

Every image is decoded to 8-bit RGB (:func:`load_rgb`): 16-bit grayscale (PNG, TIFF) is scaled
to 8 bit; a mode with no known value range (32-bit integer or float) is not guessed at.
An image that fails to decode is reported once (per process) with an
:class:`UnreadableImageWarning` naming the file, and the next sample is returned in its place.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from adaptive_vit.data.source import Transform

_MAX_SUBSTITUTES = 32  # consecutive unreadable files tolerated before giving up
_16_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})  # unsigned 16-bit grayscale
# modes Pillow converts to RGB without losing their meaning (8 bits a channel, or fewer)
_8_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                          "YCbCr", "LAB", "HSV"})


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded."""


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
        super().__init__(str(root), transform=transform, loader=load_rgb, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {name: i for i, name in enumerate(self._fixed_classes)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(_MAX_SUBSTITUTES):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except (OSError, ImageModeError) as error:
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
