"""`ExactResume`: a resumed fit draws the same random numbers as an uninterrupted one.

Lightning stores no RNG state, and drop path, dropout and Gumbel noise draw from the global torch
stream in `training_step` (data augmentation and Mixup have their own seeds, see
`adaptive_vit.data`). This callback keeps the global RNG states in its `state_dict`, which
Lightning saves in every checkpoint and hands back when a fit resumes; it restores them at the
first training batch (after the sanity check, which may draw too). A checkpoint written while a
batch was under way (an exception, an interrupt) resumes at that batch: it stores the states of
the batch's start, not the current ones. Every `AdaptiveLitModule` adds it
(`configure_callbacks`), so it is there even with `--trainer.callbacks []`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class ExactResume(Callback):
    """Saves the global RNG states with every checkpoint and restores them on resuming."""

    def __init__(self) -> None:
        self._batch_rng: dict[str, Any] | None = None  # states at the current batch's start
        self._to_restore: dict[str, Any] | None = None  # states a resumed fit continues from
        self._trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._to_restore is not None:  # first batch after resuming: continue the streams
            set_rng_states(self._to_restore)
            self._to_restore = None
        self._batch_rng = rng_states()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batch_rng = rng_states()  # = the next batch's start: nothing draws in between

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if self._to_restore is not None:  # resumed, and interrupted again before a batch ran
            return {"rng": self._to_restore}
        if progress.ready > progress.processed and self._batch_rng is not None:  # not yet trained
            return {"rng": self._batch_rng}
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("rng")


def rng_states() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and python RNG states, as tensors and plain
    Python values (loadable with `weights_only=True`)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore `rng_states()`. Under DDP every rank restores rank 0's states: ranks seeded
    alike (`seed_everything`, the default) had the same ones anyway."""
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
