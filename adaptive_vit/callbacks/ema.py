"""`ModelEMA`: the model EMA of the LV-ViT and CF-ViT (LV-ViT) recipes, Lightning's
`EMAWeightAveraging` made safe for this tool's exit thresholds and checkpoints.

What Lightning's callback does (`lightning.pytorch.callbacks.weight_averaging`, 2.6): it keeps an
`AveragedModel` copy of the LightningModule, updated after every optimiser step to
decay·average + (1 − decay)·current over the parameters and buffers (BatchNorm statistics
included). During validation it swaps the averaged values into the module, so `val/*`, the
calibration and the checkpoint picked as best are the EMA's, as the authors select on
`validate(model_ema)`. At the end of `fit` it copies them into the module. Every checkpoint holds
the averaged weights in `state_dict` (what `test`, `validate`, `predict`, `benchmark` and
`init_from` load) and the raw ones in `current_model_state` (what a resumed fit trains on).

What this subclass changes, and why:

- The exit thresholds (`net.exit_thresholds`, a buffer so that they travel in every state_dict)
  and non-floating buffers are settings, not weights. Lightning's callback would average them and
  swap them: validation would run with the averaged copy's stale thresholds (`ExitPolicy` sets
  the module's in `on_validation_start`, before the swap), and the thresholds calibrated at the
  end of validation would go back into the copy. Here the copy takes the module's settings before
  every swap, copy and save, so the settings are never averaged or swapped.
- A checkpoint written while the averaged weights are swapped in (Ctrl+C during validation:
  `ResumableCheckpoint` saves on the exception) would store the two states the wrong way round,
  and the resumed fit would train on the average. Here it stores them as at any other time.
- Evaluating a checkpoint (`test`, `validate`, `predict`): its `state_dict` already holds the
  averaged weights, so there is nothing to restore, and Lightning's warning saying so is left out.

Deviation from the authors (timm's `ModelEmaV2`, updated after every step from the model's
initial weights): Lightning's first update copies the weights after the first step instead of
averaging them with the initial ones, one step of 375,000 in their recipe.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging


class ModelEMA(EMAWeightAveraging):
    """An exponential moving average of the weights, validated, saved and tested in their place
    (see the module docstring).

    Args:
        decay: weight of the average at each optimiser step (the authors' `--model-ema-decay`:
            0.99992, a horizon of 1 / (1 − decay) = 12,500 steps, 10 epochs of ImageNet at a
            global batch of 1024).
        device: where the average lives (None: with the model; "cpu" saves accelerator memory).
    """

    def __init__(self, decay: float = 0.99992, device: str | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in (0, 1), got {decay}; the authors use 0.99992.")
        super().__init__(device=device, decay=decay)
        self._swapped = False  # the module holds the averaged weights (during validation)

    def _copy_settings(self, pl_module: LightningModule) -> None:
        """The module's exit thresholds and non-floating buffers into the averaged copy."""
        if self._average_model is None:
            return
        average = dict(self._average_model.module.named_buffers())
        with torch.no_grad():
            for name, buffer in pl_module.named_buffers():
                if name.endswith("exit_thresholds") or not buffer.is_floating_point():
                    average[name].copy_(buffer)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._copy_settings(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)
        self._swapped = self._average_model is not None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._copy_settings(pl_module)
        super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._copy_settings(pl_module)
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._copy_settings(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._swapped and "current_model_state" in checkpoint:  # the module holds the average
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"], checkpoint["state_dict"])

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._average_model is not None:  # fitting: the average and the raw weights both resume
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
