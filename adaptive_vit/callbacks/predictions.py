"""`PredictionWriter`: what `adaptive-vit predict` answers, image by image, in a CSV of the run.

It reads `AdaptiveLitModule.predict_step`'s outputs (``prediction``, ``confidence``, ``exit``,
``gflops``, one value per image) and writes them as they come, batch by batch, to
``<run folder>/predictions.csv``: one row per image with its index in the predict set, its file
(data read from image files), the predicted class (its name when the data module has
``class_names``) and class index, the confidence (max softmax), the exit that answered and the
GFLOPs executed. Under DDP each process writes its own images to ``predictions_rank<N>.csv``.
"""

from __future__ import annotations

import csv
import os
from typing import IO, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset, Subset


class PredictionWriter(BasePredictionWriter):
    """Writes `predict`'s answers to a CSV file in the run folder (see the module docstring).

    Args:
        filename: the file's name in the run folder (`trainer.log_dir`).
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename
        self.path: str | None = None
        self._file: IO[str] | None = None
        self._rows = 0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank asks
        name = self.filename if trainer.world_size == 1 else _per_rank(self.filename, trainer.global_rank)
        self.path = os.path.join(log_dir, name)
        os.makedirs(log_dir, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        csv.writer(self._file).writerow(["index", "path", "class", "class_index", "confidence", "exit", "gflops"])
        self._rows = 0

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: list[int] | None, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        dataset = _dataset(trainer, dataloader_idx)
        names = getattr(trainer.datamodule, "class_names", None)
        exit_names = pl_module.net.exit_names
        classes = prediction["prediction"].tolist()
        indices = batch_indices if batch_indices is not None else [None] * len(classes)
        writer = csv.writer(self._file)
        for index, label, confidence, exit_index, gflops in zip(
            indices, classes, prediction["confidence"].tolist(), prediction["exit"].tolist(),
            prediction["gflops"].tolist(),
        ):
            path = _file_of(dataset, index) if index is not None and dataset is not None else None
            writer.writerow([index, path or "", names[label] if names else label, label,
                                   f"{confidence:.6f}", exit_names[exit_index], f"{gflops:.6g}"])
        self._rows += len(classes)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()
        rank_zero_info(f"predictions of {self._rows} images: {self.path}")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _per_rank(filename: str, rank: int) -> str:
    stem, ext = os.path.splitext(filename)
    return f"{stem}_rank{rank}{ext}"


def _dataset(trainer: Trainer, dataloader_idx: int) -> Dataset | None:
    loaders = trainer.predict_dataloaders
    loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
    return getattr(loader, "dataset", None)


def _file_of(dataset: Dataset, index: int) -> str | None:
    """The image file behind `dataset[index]`, for datasets read from files (an ImageFolder's
    `samples`, possibly inside Subsets); None for others."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else None
