"""The data sets :class:`~adaptive_vit.data.ImageDataModule` knows, by their ``dataset`` name."""

from __future__ import annotations

from adaptive_vit.data.cifar import Cifar10Source, Cifar100Source
from adaptive_vit.data.demo import DemoSource
from adaptive_vit.data.folder import FolderSource
from adaptive_vit.data.imagenet import ImageNetSource
from adaptive_vit.data.source import DataSource

SOURCES: dict[str, type[DataSource]] = {
    "imagenet": ImageNetSource,
    "cifar10": Cifar10Source,
    "cifar100": Cifar100Source,
    "folder": FolderSource,
    "demo": DemoSource,
}
DATASETS = tuple(SOURCES)


def source_class(dataset: str) -> type[DataSource]:
    """The source registered as ``dataset``, or an error naming the known ones.

    Args:
        dataset: the ``dataset`` name of the data config.
    """
    if dataset not in SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return SOURCES[dataset]
