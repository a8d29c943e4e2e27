"""`AdaptiveLitModule`: what every method's LightningModule shares.

A method subclasses it and fills in two hooks:

- `configure_network()` → its `AdaptiveNetwork` (the plain nn.Module);
- `compute_loss(output, target)` → (loss, logs) from `forward_train`'s output.

Everything else is here, once: the DeiT optimiser (AdamW, no decay on norms, biases, position
embeddings and cls tokens; per-step cosine schedule with linear warm-up), soft-target or plain CE,
torchmetrics top-1/top-5, the adaptive evaluation (real early exit at the current thresholds,
mean GFLOPs, exit histogram, per-exit "anytime" accuracy), thresholds and calibrations that
travel in the checkpoint, and `init_from` (start from another run's or another code base's
weights). The step outputs carry per-image confidences, correctness, GFLOPs and exits, which is
all the callbacks (calibration, FLOPs budget, robustness) read.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.aggregation import BaseAggregator
from torchmetrics.classification import MulticlassAccuracy

from adaptive_vit.methods.network import AdaptiveNetwork, AdaptiveOutput

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")


class AdaptiveLitModule(LightningModule):
    """Template LightningModule of every method (see the module docstring).

    Args:
        num_classes: classifier outputs (linked from the data module by the CLI).
        lr: peak learning rate (AdamW), for the whole run's global batch.
        weight_decay: AdamW weight decay; not applied to norms, biases, pos embeds, cls tokens.
        betas: AdamW betas.
        warmup_epochs: linear warm-up length, in epochs (fractions allowed).
        warmup_lr: learning rate at the first step.
        min_lr: learning rate at the end of the cosine schedule.
        init_from: weights to start from: a checkpoint of this tool (`.ckpt`), a state_dict of
            this method's network, or a layout the method recognises (its authors' releases).
        thresholds: exit thresholds given by hand (one per exit but the last); they override
            calibrated ones. None keeps the checkpoint's (default: every image to the last exit).
        budget: the name of a calibrated budget (see the calibration callback) to evaluate with.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        init_from: str | None = None,
        thresholds: list[float] | None = None,
        budget: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: AdaptiveNetwork = self.configure_network()
        # calibrated thresholds per budget name: {"name": {"thresholds": [...], "gflops": ...}}
        self.calibrations: dict[str, dict[str, Any]] = {}
        # RNG states at the start of the current training batch, and those to restore when a fit
        # resumes: see `on_save_checkpoint`
        self._batch_rng: dict[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self.configure_metrics()
        if init_from:
            self.load_init_weights(init_from)
        if thresholds is not None:
            self.net.set_thresholds(thresholds)

    # ------------------------------------------------------------------ hooks for methods

    def configure_network(self) -> AdaptiveNetwork:
        raise NotImplementedError

    def compute_loss(self, output: Any, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Default: one classification loss on `forward_train`'s logits."""
        return self.criterion(output, target), {}

    def has_trained_weights(self) -> bool:
        """Whether evaluating without `--ckpt_path` makes sense (pretrained or `init_from`)."""
        return bool(self.hparams.init_from)

    def convert_foreign_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Tensor] | None:
        """Recognise another code base's checkpoint and return this network's state_dict."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups before the weight-decay split; methods may set their own `lr`."""
        return [{"params": list(self.net.named_parameters())}]

    # ------------------------------------------------------------------ set-up

    def configure_metrics(self) -> None:
        n = self.hparams.num_classes

        def accuracies() -> MetricCollection:
            return MetricCollection({
                "top1": MulticlassAccuracy(n, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(n, top_k=min(5, n), average="micro"),
            })

        self.train_top1 = MulticlassAccuracy(n, top_k=1, average="micro")
        self.eval_metrics = nn.ModuleDict({
            stage: nn.ModuleDict({
                "adaptive": accuracies(),
                "exits": nn.ModuleList(
                    MulticlassAccuracy(n, top_k=1, average="micro") for _ in range(self.net.num_exits)
                ),
                "gflops": MeanMetric(),
                "exit_counts": nn.ModuleList(SumMetric() for _ in range(self.net.num_exits)),
            })
            for stage in ("val", "test")
        })

    @property
    def exit_gflops(self) -> list[float]:
        return self.net.exit_gflops()

    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        """Soft-target CE for mixup / label-smoothed targets (float), plain CE for class indices."""
        if target.is_floating_point():
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = []
        for group in self.param_groups():
            named = [(n, p) for n, p in group.pop("params") if p.requires_grad]
            decay = [p for n, p in named if p.ndim > 1 and not n.endswith(NO_DECAY_NAMES)]
            no_decay = [p for n, p in named if not (p.ndim > 1 and not n.endswith(NO_DECAY_NAMES))]
            groups += [
                {**group, "params": decay, "weight_decay": hp.weight_decay},
                {**group, "params": no_decay, "weight_decay": 0.0},
            ]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = int(hp.warmup_epochs * per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [self._lr_factor(g.get("lr", hp.lr), warmup, total) for g in groups]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, peak: float, warmup: int, total: int):
        """Linear warm-up from `warmup_lr`, then cosine down to `min_lr`: a factor on `peak`."""
        start, floor = self.hparams.warmup_lr, self.hparams.min_lr

        def factor(step: int) -> float:
            if step < warmup:
                return (start + (peak - start) * step / warmup) / peak
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return (floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))) / peak

        return factor

    # ------------------------------------------------------------------ steps

    def forward(self, x: Tensor) -> Tensor:
        # in the module's dtype: callbacks (the robustness attacks) pass float32 images, which a
        # `bf16-true` / `16-true` module cannot take (Lightning converts only its steps' inputs)
        return self.net(x.to(self.dtype))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        x, target = batch
        output = self.net.forward_train(x)
        loss, logs = self.compute_loss(output, target)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        for name, value in logs.items():
            if value.ndim == 0:
                self.log(f"train/{name}", value, batch_size=x.shape[0])
        return {"loss": loss, **{k: v.detach() for k, v in logs.items() if v.ndim > 0}}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = self.net.forward_adaptive(x, self.net.exit_thresholds.tolist())
        return {"prediction": out.logits.argmax(-1), "exit": out.exit_index, "gflops": out.gflops}

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        x, target = batch
        metrics = self.eval_metrics[stage]
        # Two passes on purpose for multi-exit networks: the reported accuracy and GFLOPs come from
        # the real early-exit path (what a user deploys), while calibration and "anytime" accuracy
        # need every exit's answer for every image.
        with torch.no_grad():
            adaptive: AdaptiveOutput = self.net.forward_adaptive(x, self.net.exit_thresholds.tolist())
            exits = self.net.forward_exits(x) if self.net.num_exits > 1 else [adaptive.logits]
        metrics["adaptive"].update(adaptive.logits, target)
        metrics["gflops"].update(adaptive.gflops)
        for k, logits in enumerate(exits):
            metrics["exits"][k].update(logits, target)
            metrics["exit_counts"][k].update((adaptive.exit_index == k).sum())
        probs = torch.stack([e.softmax(-1) for e in exits], dim=1)  # (B, K, C)
        confidences, predictions = probs.max(-1)  # (B, K)
        step = {
            "confidences": confidences,
            "correct": predictions == target[:, None],
            "gflops": adaptive.gflops,
            "exit_index": adaptive.exit_index,
            "logits": adaptive.logits,
        }
        if adaptive.decisions:
            step["decisions"] = adaptive.decisions
        return step

    def on_validation_start(self) -> None:
        # While fitting, the calibration callback names the budget once it has calibrated one.
        self.select_thresholds(strict=self.trainer.state.fn != "fit")
        self._aggregate_in_float32()

    def on_test_start(self) -> None:
        self.select_thresholds()
        self._aggregate_in_float32()

    def _aggregate_in_float32(self) -> None:
        """Keep the mean GFLOPs and the exit counts in float32. `precision: bf16-true` / `16-true`
        convert the whole module with `.to(dtype)`, metric states included (torchmetrics guards
        only `.half()`-style calls), and a bfloat16 sum stops growing by one at 256."""
        for metric in self.eval_metrics.modules():
            if isinstance(metric, BaseAggregator):
                metric.set_dtype(torch.float32)

    def on_predict_start(self) -> None:
        self.select_thresholds()

    def select_thresholds(self, default_budget: str | None = None, strict: bool = True) -> None:
        """Set the network's exit thresholds, in this order of precedence: given by hand
        (`thresholds`), the calibrated budget named by `budget`, then `default_budget`; with none
        of them the current ones (e.g. the checkpoint's) stay.

        Called at the start of validation, test and predict (after a checkpoint has been loaded,
        whose thresholds would otherwise replace the ones given by hand) and by the calibration
        callback.

        Args:
            default_budget: the calibrated budget to use when `budget` is not set.
            strict: raise if the budget to use is not calibrated (else keep the thresholds).
        """
        if self.hparams.thresholds is not None:
            self.net.set_thresholds(self.hparams.thresholds)
            return
        name = self.hparams.budget or default_budget
        if name is None:
            return
        if name in self.calibrations:
            self.net.set_thresholds(self.calibrations[name]["thresholds"])
        elif strict:
            raise ValueError(
                f"budget {name!r} is not calibrated in this model; calibrated budgets: "
                f"{sorted(self.calibrations) or 'none'}. Pick one of them, or calibrate it with the "
                "ThresholdCalibration callback (during `fit`, or `validate --ckpt_path ...`)."
            )

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        for name, value in metrics["adaptive"].compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "top1", sync_dist=False)
        metrics["adaptive"].reset()
        self.log(f"{stage}/gflops", metrics["gflops"].compute(), prog_bar=True)
        metrics["gflops"].reset()
        counts = torch.stack([c.compute() for c in metrics["exit_counts"]]).float()
        for k, name in enumerate(self.net.exit_names):
            if self.net.num_exits > 1:
                self.log(f"{stage}/exit_{name}/top1", metrics["exits"][k].compute())
                self.log(f"{stage}/exit_{name}/fraction", counts[k] / counts.sum().clamp(min=1))
            metrics["exits"][k].reset()
            metrics["exit_counts"][k].reset()

    # ------------------------------------------------------------------ weights and state

    def load_init_weights(self, path: str) -> None:
        """Load `init_from`: a `.ckpt` of this tool, a state_dict, or a recognised foreign layout."""
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"init_from: no such file {path!r}. Pass a checkpoint written by `adaptive-vit fit` "
                "(runs/<name>/version_*/checkpoints/*.ckpt) or a state_dict file."
            )
        checkpoint = load_checkpoint_file(path)
        state = self.state_dict_from(checkpoint, path)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "exit_thresholds" and not self.may_be_missing(k)]
        if missing or unexpected:
            raise ValueError(
                f"init_from {path!r} does not fit {type(self.net).__name__}: "
                f"missing keys {_short(missing)}, unexpected keys {_short(unexpected)}. "
                "Is it a checkpoint of another method or backbone? Use a checkpoint of the same "
                "method and backbone configuration."
            )
        if isinstance(checkpoint, dict) and "calibrations" in checkpoint.get("adaptive_vit", {}):
            self.calibrations = dict(checkpoint["adaptive_vit"]["calibrations"])

    def may_be_missing(self, key: str) -> bool:
        """Keys a method builds fresh when starting from another stage (e.g. a new controller)."""
        return False

    def state_dict_from(self, checkpoint: Any, path: str) -> dict[str, Tensor]:
        if isinstance(checkpoint, dict) and "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:
            method = checkpoint.get("adaptive_vit", {}).get("method")
            if method and method != type(self).__name__ and not self.accepts_checkpoint_of(method):
                raise ValueError(
                    f"init_from {path!r} is a {method} checkpoint, not {type(self).__name__}. "
                    "Use a checkpoint written by the same method (or its earlier stage)."
                )
            return {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        foreign = self.convert_foreign_checkpoint(checkpoint) if isinstance(checkpoint, dict) else None
        if foreign is not None:
            return foreign
        if isinstance(checkpoint, dict) and all(isinstance(v, Tensor) for v in checkpoint.values()):
            return checkpoint
        raise ValueError(
            f"init_from {path!r}: not a checkpoint of this tool, not a state_dict, and not a layout "
            f"{type(self).__name__} recognises (top-level keys: {_short(list(checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__})."
        )

    def accepts_checkpoint_of(self, method: str) -> bool:
        """Whether `init_from` may take another method's checkpoint (MIA-Former takes a static one)."""
        return False

    # ------------------------------------------------------------------ exact resume

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # first batch after resuming: continue the streams
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self._batch_rng = rng_states()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_rng = rng_states()  # = the next batch's start: nothing draws in between

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the calibrations and the RNG states a resumed fit continues from.

        Lightning stores no RNG state, and drop path, dropout and Gumbel noise draw from the
        global torch stream in `training_step` (data augmentation and Mixup have their own seeds,
        see `adaptive_vit.data`). A resumed fit restores the states at its first training batch
        (after the sanity check, which may draw too). A checkpoint written while a batch was under
        way (an exception, an interrupt) resumes at that batch: it stores the states of the
        batch's start, not the current ones. Subclasses overriding `on_train_batch_start/end`
        call super().
        """
        checkpoint["adaptive_vit"] = {"method": type(self).__name__, "calibrations": self.calibrations}
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if self._rng_to_restore is not None:  # resumed, and interrupted again before a batch ran
            rng = self._rng_to_restore
        elif progress.ready > progress.processed and self._batch_rng is not None:  # not yet trained
            rng = self._batch_rng
        else:
            rng = rng_states()
        checkpoint["adaptive_vit"]["rng"] = rng

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("adaptive_vit", {})
        method = saved.get("method")
        if method and method != type(self).__name__:
            raise ValueError(
                f"this checkpoint was written by {method}, but the configured model is "
                f"{type(self).__name__}. Use the config the checkpoint was trained with "
                "(the run's saved config.yaml) or a checkpoint of this method."
            )
        self.calibrations = dict(saved.get("calibrations", {}))
        self._rng_to_restore = saved.get("rng")


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


def load_checkpoint_file(path: str, extra_safe_globals: Iterable[Any] = ()) -> Any:
    """`torch.load` an untrusted file with `weights_only=True`, allowlisting only what checkpoints
    commonly hold beside tensors (argparse.Namespace, numpy scalars and arrays)."""
    import argparse

    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    # numpy 1.x pickles name numpy.core.*, numpy 2.x numpy._core.*: allow both spellings.
    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype, *extra_safe_globals]
    for name in ("scalar", "_reconstruct"):
        obj = getattr(multiarray, name)
        allowed += [(obj, f"numpy.core.multiarray.{name}"), (obj, f"numpy._core.multiarray.{name}")]
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors name the type that is not allowed
        raise ValueError(
            f"could not load {path!r} safely ({str(err).splitlines()[0]}). Checkpoints are loaded "
            "with weights_only=True; convert the file to a plain state_dict "
            "(torch.save(ckpt['model'], 'weights.pth')) if it holds other Python objects."
        ) from None


def _short(keys: list[str], n: int = 8) -> str:
    keys = list(keys)
    return "[]" if not keys else str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")
