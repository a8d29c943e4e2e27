"""`RobustnessEvaluation`: clean and adversarial top-1 under torchattacks (PGD, FGSM, ...).

The attacks work in [0, 1] pixel space, as the papers state their ε, although the batches are
normalised: torchattacks' `set_normalization_used(mean, std)` (3.5.x) un-normalises each batch,
attacks it while normalising inside every model call, and hands back a normalised adversarial
batch. mean/std come from the data module (`ImageDataModule.mean/std`) or from this callback's
arguments. The attacked model is the LightningModule itself, whose `forward` returns the logits of
the network's adaptive prediction at its current thresholds: gradients flow through the path each
image actually takes (exits, skipped blocks), in eval mode.

"Clean" top-1 is measured on the same un-normalised, clipped to [0, 1] and re-normalised batch that
the attacks start from, so an attack with ε = 0 reproduces it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

# MIA-Former's robustness setting: PGD with eps 0.002 (10 steps) and FGSM with eps 0.03.
DEFAULT_ATTACKS: tuple[dict[str, Any], ...] = (
    {"name": "PGD", "eps": 0.002, "alpha": 0.0005, "steps": 10, "random_start": True},
    {"name": "FGSM", "eps": 0.03},
)


class RobustnessEvaluation(Callback):
    """Log clean and robust top-1 per attack at `test` (and, optionally, during validation).

    Logged: ``<stage>/robust/clean_top1`` and ``<stage>/robust/<label>/top1`` per attack, with
    label e.g. ``pgd_eps0.002``.

    Args:
        attacks: torchattacks attacks as ``{name: <class in torchattacks>, <its arguments>}``; eps
            in [0, 1] pixel units. PGD without ``alpha`` gets ``eps / 4``. Default: MIA-Former's
            PGD (eps 0.002, alpha 0.0005, 10 steps, random start) and FGSM (eps 0.03).
        on_test: attack every test batch.
        every_n_val_epochs: also attack during validation every N validation epochs (None: never).
        num_batches: batches attacked in such a validation epoch, over all processes: under DDP
            each rank attacks its first ``ceil(num_batches / world_size)`` batches (the ranks
            interleave the images, so these are the first ``num_batches`` of one process when
            world_size divides it): a fixed set of about ``num_batches * batch_size`` images.
        mean: normalisation mean, if the data module has no ``mean`` attribute.
        std: normalisation std, if the data module has no ``std`` attribute.
        seed: seed of the attacks' random starts (e.g. PGD's): batch ``b`` of rank ``r`` of ``W``
            is attacked under ``seed + b * W + r`` (its global index), so runs are reproducible
            and no two batches share a start; the global RNG is left untouched.
    """

    def __init__(
        self,
        attacks: Sequence[dict[str, Any]] | None = None,
        on_test: bool = True,
        every_n_val_epochs: int | None = None,
        num_batches: int = 4,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        import torchattacks

        self.specs = [dict(spec) for spec in (attacks if attacks is not None else DEFAULT_ATTACKS)]
        for spec in self.specs:
            cls = getattr(torchattacks, str(spec.get("name")), None)
            if not (isinstance(cls, type) and issubclass(cls, torchattacks.attack.Attack)):
                raise ValueError(
                    f"RobustnessEvaluation: unknown attack {spec.get('name')!r}; give each attack a "
                    "`name` of a torchattacks class (e.g. PGD, FGSM) and its arguments (eps, ...)."
                )
            if spec["name"] == "PGD" and "alpha" not in spec and "eps" in spec:
                spec["alpha"] = spec["eps"] / 4
        if every_n_val_epochs is not None and every_n_val_epochs < 1:
            raise ValueError(f"RobustnessEvaluation: every_n_val_epochs must be >= 1, got {every_n_val_epochs}")
        self.on_test = on_test
        self.every_n_val_epochs = every_n_val_epochs
        self.num_batches = num_batches
        self.mean, self.std = mean, std
        self.seed = seed
        self._attacks: dict[str, Any] | None = None  # label -> attack, while attacking
        self._counts: Tensor | None = None  # (1 + attacks, ) right answers: clean, then each attack
        self._total: Tensor | None = None
        self._val_epochs = 0

    @staticmethod
    def label(spec: dict[str, Any]) -> str:
        eps = spec.get("eps")
        return f"{spec['name'].lower()}_eps" + (f"{eps:g}" if isinstance(eps, (int, float)) else "default")

    def batches_per_rank(self, world_size: int) -> int:
        """Each process's share of `num_batches` in a validation epoch."""
        return math.ceil(self.num_batches / world_size)

    def batch_seed(self, batch_idx: int, trainer: Trainer) -> int:
        """The seed of this rank's batch `batch_idx`: `seed` + the batch's global index."""
        return self.seed + batch_idx * trainer.world_size + trainer.global_rank

    # ------------------------------------------------------------------ when

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_test:
            self._start(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.every_n_val_epochs
        if n and not trainer.sanity_checking and (self._val_epochs + 1) % n == 0:
            self._start(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._attacks is not None:
            self._attack_batch(pl_module, batch, self.batch_seed(batch_idx, trainer))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        in_limit = batch_idx < self.batches_per_rank(trainer.world_size)
        if self._attacks is not None and in_limit and dataloader_idx == 0:
            self._attack_batch(pl_module, batch, self.batch_seed(batch_idx, trainer))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(pl_module, "test")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_epochs += 1
        self._finish(pl_module, "val")

    # ------------------------------------------------------------------ how

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        import torchattacks

        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "RobustnessEvaluation needs gradients, but this Trainer evaluates under "
                "torch.inference_mode. Set `trainer.inference_mode: false` in the config "
                "(or pass --trainer.inference_mode false; Trainer(inference_mode=False) in Python)."
            )
        mean, std = self._normalisation(trainer)
        self._attacks = {}
        for spec in self.specs:
            kwargs = {k: v for k, v in spec.items() if k != "name"}
            attack = getattr(torchattacks, spec["name"])(pl_module, **kwargs)
            attack.set_normalization_used(mean, std)
            self._attacks[self.label(spec)] = attack
        self._counts = torch.zeros(1 + len(self.specs), device=pl_module.device)
        self._total = torch.zeros((), device=pl_module.device)

    def _normalisation(self, trainer: Trainer) -> tuple[list[float], list[float]]:
        datamodule = getattr(trainer, "datamodule", None)
        mean = getattr(datamodule, "mean", None) or self.mean
        std = getattr(datamodule, "std", None) or self.std
        if mean is None or std is None:
            raise ValueError(
                "RobustnessEvaluation: the data module has no `mean`/`std`; give the callback the "
                "normalisation the data use (mean: [..], std: [..]) so eps is in [0, 1] pixel units."
            )
        return [float(m) for m in mean], [float(s) for s in std]

    def _attack_batch(self, pl_module: LightningModule, batch: Any, seed: int) -> None:
        x, target = batch[0], batch[1]  # x normalised (B, C, H, W); target (B,) class indices
        first = next(iter(self._attacks.values()))
        clean = first.normalize(first.inverse_normalize(x).clamp(0, 1))  # what the attacks start from
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(seed)
            with torch.no_grad():
                right = [(pl_module(clean).argmax(-1) == target).sum()]
            for attack in self._attacks.values():
                adversarial = attack(clean, target)  # normalised again
                with torch.no_grad():
                    right.append((pl_module(adversarial).argmax(-1) == target).sum())
        self._counts += torch.stack(right).float()
        self._total += len(target)

    def _finish(self, pl_module: LightningModule, stage: str) -> None:
        if self._attacks is None:
            return
        counts = pl_module.trainer.strategy.reduce(self._counts, reduce_op="sum")
        total = pl_module.trainer.strategy.reduce(self._total, reduce_op="sum").clamp(min=1)
        accuracy = counts / total
        pl_module.log(f"{stage}/robust/clean_top1", accuracy[0])
        for label, value in zip(self._attacks, accuracy[1:]):
            pl_module.log(f"{stage}/robust/{label}/top1", value)
        self._attacks = self._counts = self._total = None
