"""The Lightning data module: one data source, the DeiT training recipe, and the loaders.

:class:`ImageDataModule` serves every data set of :mod:`adaptive_vit.data.registry` through
one interface (see each source's module for its layout and splits).

Training batches get the DeiT augmentation recipe from timm. When ``mixup``, ``cutmix`` or
``label_smoothing`` is positive, training targets become soft targets of shape
``(batch, num_classes)`` on the device (see :attr:`ImageDataModule.soft_targets`);
validation, test and predict batches always keep integer labels.

Training randomness is seeded (see :mod:`adaptive_vit.data.sampler`), each batch's
Mixup/CutMix from (seed, epoch, batch): a fit resumed from a mid-epoch checkpoint (whose
position :meth:`ImageDataModule.state_dict` stores) continues with exactly the batches it would
have seen.

Unreadable image files do not stop a run, and each is named in a warning: validation, test and
predict batches leave them out (each process counts exactly the images it read), training
batches take the next readable image in their place (see :mod:`adaptive_vit.data.images`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, Dataset, Sampler

from adaptive_vit.data.images import ReadableBatches, collate_readable
from adaptive_vit.data.registry import source_class
from adaptive_vit.data.sampler import ResumableSampler, TrainingSamples, mix_seeds, seeded
from adaptive_vit.data.source import SPLITS, Stats, Transform
from adaptive_vit.data.token_labels import TokenLabeler, with_token_labels

_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _smooth_labels(
    images: torch.Tensor, targets: torch.Tensor, num_classes: int, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label smoothing without mixing: integer labels -> smoothed one-hot soft targets."""
    return images, mixup_target(targets, num_classes, smoothing=smoothing)


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, keeping 0 bits giving a black image (as Pillow < 13 did, not an error)."""
    if bits_to_keep < 1:
        return Image.new(image.mode, image.size)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


def _allow_zero_bit_posterize(transform: Any) -> Any:
    """``transform`` with its AutoAugment/RandAugment/AugMix posterize ops using :func:`_posterize`.

    timm's ``Posterize`` and ``PosterizeIncreasing`` keep 0 bits at the ends of the magnitude
    range (magnitude 10 is reached by the ``mstd`` noise of the default ``rand-m9-mstd0.5-inc1``
    in about one training image in 700), and Pillow 13 refuses 0 bits with a ValueError.

    Args:
        transform: a timm training transform (a ``Compose``).
    """
    for step in transform.transforms:
        ops = getattr(step, "ops", None) or [op for sub in getattr(step, "policy", ()) for op in sub]
        for op in ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


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
        token_labels: str | None = None,
        token_label_grid: int = 14,
    ) -> None:
        """Configure the data; only ``folder`` reads anything (its class list) before :meth:`setup`.

        Args:
            dataset: The data set, one of ``imagenet``, ``cifar10``, ``cifar100``, ``folder``,
                ``demo`` (:data:`adaptive_vit.data.registry.SOURCES`).
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
            token_labels: Folder of token-labeling maps for the training images (the
                TokenLabeling release's format, see :mod:`adaptive_vit.data.token_labels`):
                training targets become ``(batch, 1 + token_label_grid², num_classes)``, cropped,
                flipped and MixToken-mixed with the image. Class-folder data sets only; not with
                ``mixup``/``cutmix``.
            token_label_grid: Token grid side of those targets (the network's finest grid: 14 for
                224 images with 16-pixel patches).
        """
        super().__init__()
        source = source_class(dataset)
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
            token_labels is None or max(mixup, cutmix) == 0.0,
            "token_labels bring their own mixing (MixToken): set mixup and cutmix to 0",
        )
        _require(
            max(mixup, cutmix) == 0.0 or batch_size % 2 == 0,
            f"mixup/cutmix need an even batch_size, got {batch_size}",
        )

        self.dataset = dataset
        self.source = source(dataset, root, val_split=val_split, seed=seed, download=download)
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self._mean, self._std = self._normalisation(mean, std)
        self._datasets: dict[str, Dataset] = {}
        # the training order's seed (drawn from the global RNG once) and, after loading a
        # mid-epoch checkpoint, where to resume: see `state_dict`
        self._train_seed: int | None = None
        self._resume: dict[str, int] = {}
        self._num_classes = self.source.num_classes

        self.train_transform = _allow_zero_bit_posterize(create_transform(
            input_size=img_size,
            is_training=True,
            scale=scale or self.source.train_scale,
            hflip=hflip if hflip is not None else self.source.hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            interpolation="bicubic",
            re_prob=reprob,
            re_mode="pixel",
            mean=self._mean,
            std=self._std,
        ))
        self.eval_transform = create_transform(
            input_size=img_size,
            is_training=False,
            interpolation="bicubic",
            crop_pct=crop_pct or self.source.crop_pct,
            mean=self._mean,
            std=self._std,
        )
        self.token_labels = token_labels
        # the training batch transform: with token labels, their targets and MixToken
        self._mixer = (TokenLabeler(self.num_classes, token_label_grid, label_smoothing) if token_labels
                       else self._make_mixer(mixup, cutmix, label_smoothing))

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
        return list(self.source.class_names)

    @property
    def soft_targets(self) -> bool:
        """Whether training batches carry soft targets ``(batch, num_classes)``, not labels."""
        return self._mixer is not None

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Download CIFAR when ``download`` is set (runs on one process per node)."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Build the splits needed by ``stage`` (all splits when ``stage`` is ``None``)."""
        for split in _STAGE_SPLITS[stage] if stage else SPLITS:
            if split not in self._datasets:
                dataset = self.source.build(split, self._transform(split))
                if split == "train" and self.token_labels is not None:
                    dataset = with_token_labels(dataset, self.token_labels, self.train_transform)
                self._datasets[split] = TrainingSamples(dataset) if split == "train" else dataset

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
        return self._make_loader(self._datasets["train"], sampler,
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
            with seeded(self._batch_seed()):  # the mix of a batch survives an interrupted run
                return self._mixer(images, targets)
        return batch

    def _batch_seed(self) -> int:
        """A seed of (run, epoch, batch, rank) for the current training batch's Mixup/CutMix."""
        trainer = self.trainer
        loop = getattr(trainer, "fit_loop", None)
        batch = loop.epoch_loop.batch_progress.current.ready if loop is not None else 0
        parts = (self._train_seed or 0, getattr(trainer, "current_epoch", 0), batch,
                 getattr(trainer, "global_rank", 0))
        return mix_seeds(*parts)

    # ------------------------------------------------------------------ helpers

    def _normalisation(self, mean: Stats | None, std: Stats | None) -> tuple[Stats, Stats]:
        mean, std = tuple(mean or self.source.mean), tuple(std or self.source.std)
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
        # unreadable images are left out, not replaced: each process counts exactly what it read
        return self._make_loader(dataset, self._eval_sampler(dataset, split), ReadableBatches,
                                 collate_fn=collate_readable)

    def _make_loader(self, dataset: Dataset, sampler: Sampler | None,
                     loader_class: type[DataLoader] = DataLoader, **options: Any) -> DataLoader:
        """A loader of ``dataset`` with this module's batch size and worker settings.

        Args:
            dataset: the split's dataset.
            sampler: its sampler (``None``: in order).
            loader_class: the DataLoader class.
            options: more DataLoader arguments (``drop_last``, ``collate_fn``...).
        """
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.accelerator.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            **options,
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
