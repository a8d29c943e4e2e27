"""``folder``: any class-folder tree with ``root/train`` and ``root/val`` and an optional ``root/test``.

Classes are the sub-folders of ``root/train`` (hidden folders such as ``.ipynb_checkpoints``
are ignored); ``val`` and ``test`` must contain the same class folders, so labels always agree
across splits. The test split falls back to ``val`` when there is no ``test`` folder.
``val_split > 0`` holds out that fraction of ``train`` (stratified, seeded by ``seed``) as the
validation split, e.g. to calibrate exit thresholds on images that are not reported on (as the
DVT authors did); ``val`` (or ``test``) is then the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from torch.utils.data import Dataset

from adaptive_vit.data.images import ClassFolderImages
from adaptive_vit.data.source import DataSource, Transform


def class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``split_dir``.

    Args:
        split_dir: the folder of one split.
    """
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def preview(names: Sequence[str], limit: int = 5) -> str:
    """Comma-separated names, shortened to ``limit`` entries for long lists.

    Args:
        names: the names to show.
        limit: how many to show at most.
    """
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in total)"


class FolderSource(DataSource):
    """A class-folder tree; its class list is read (once) when first asked for."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @cached_property
    def class_names(self) -> list[str]:
        """Class folder names of the training split, defining the labels of all splits."""
        train_dir = self._split_dir("train")
        classes = class_dirs(train_dir)
        if not classes:
            raise FileNotFoundError(f"no class folders in {train_dir}; expected {self._layout()}")
        return classes

    def build(self, split: str, transform: Transform) -> Dataset:
        classes = self.class_names
        held_out = self.val_split > 0 and split in ("train", "val")
        split_dir = self._split_dir("train" if held_out else split)
        self._check_same_classes(split_dir)
        dataset = ClassFolderImages(split_dir, classes, transform)
        if not dataset.samples:
            raise FileNotFoundError(f"no images found in {split_dir}; expected {self._layout()}")
        labelled = set(dataset.targets)
        empty = [str(split_dir / name) for label, name in enumerate(classes) if label not in labelled]
        if empty:
            raise FileNotFoundError(
                f"empty class folders (no images with a supported extension): {preview(empty)}; "
                "add images or remove the folder from every split"
            )
        return self.hold_out(dataset, split) if held_out else dataset

    def test_folder(self) -> str:
        """The folder of the test split: ``test`` when there is one, else ``val``."""
        return "test" if (self.root / "test").is_dir() else "val"

    def _layout(self) -> str:
        return f"{self.root}/train/<class>/<image>.jpg and {self.root}/val/<class>/<image>.jpg"

    def _split_dir(self, split: str) -> Path:
        """The folder of ``split`` (see :meth:`test_folder`), checked to exist."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist; expected {self._layout()}")
        split_dir = self.root / (self.test_folder() if split == "test" else split)
        if not split_dir.is_dir():
            raise FileNotFoundError(f"missing split folder {split_dir}; expected {self._layout()}")
        return split_dir

    def _check_same_classes(self, split_dir: Path) -> None:
        found, classes = class_dirs(split_dir), self.class_names
        if found != classes:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise FileNotFoundError(
                f"class folders of {split_dir} differ from {self.root / 'train'}: "
                f"missing [{preview(missing)}], unexpected [{preview(extra)}]; every split needs "
                f"the same <class> folders ({self._layout()})"
            )
