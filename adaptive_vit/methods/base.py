"""`AdaptiveLitModule`: what every method's LightningModule shares.

A method subclasses it and fills in two hooks:

- `configure_network()` → its `AdaptiveNetwork` (the plain nn.Module);
- `compute_loss(output, target)` → (loss, logs) from `forward_train`'s output.

Everything else is here, once: the backbone group (`BackboneSpec`, built by the method through
`adaptive_vit.backbones`), the DeiT optimiser (AdamW, no decay on norms, biases, position
embeddings and cls tokens; per-step cosine schedule with linear warm-up), soft-target or plain CE,
torchmetrics top-1/top-5, and the adaptive evaluation (real early exit at the current thresholds,
mean GFLOPs, exit histogram, per-exit "anytime" accuracy). The step outputs carry per-image
confidences, correctness, GFLOPs and exits, which is all the callbacks (calibration, FLOPs budget,
robustness) read. Elsewhere, each with one job: which thresholds the network answers with
(`thresholds.ExitPolicy`), loading weights and `init_from` (`adaptive_vit.checkpoints`), and the
RNG state of an exact resume (`callbacks.resume.ExactResume`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.aggregation import BaseAggregator
from torchmetrics.classification import MulticlassAccuracy

from adaptive_vit.backbones import BackboneSpec
from adaptive_vit.callbacks.resume import ExactResume
from adaptive_vit.checkpoints import load_init_weights, restore_saved_state
from adaptive_vit.methods.network import AdaptiveNetwork, AdaptiveOutput
from adaptive_vit.methods.thresholds import ExitPolicy
from adaptive_vit.methods.token_labeling import soft_target_cross_entropy

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "attention_biases")  # the last: LeViT's


class AdaptiveLitModule(LightningModule):
    """Template LightningModule of every method (see the module docstring).

    Args:
        backbone: the backbone (`BackboneSpec`: name, pretrained, img_size, patch_size,
            drop_path_rate, fused_attn, kwargs); a method may set some of its fields itself.
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
        backbone: BackboneSpec = BackboneSpec(),  # noqa: B008 (jsonargparse reads the default; never mutated)
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
        self.backbone_spec = backbone
        # hparams (and so every checkpoint) hold plain values: the file loads with weights_only=True
        self.hparams["backbone"] = asdict(backbone)
        self.net: AdaptiveNetwork = self.configure_network()
        self.exit_policy = ExitPolicy(self.net, thresholds, budget)
        self.configure_metrics()
        if init_from:
            load_init_weights(self, init_from)

    # ------------------------------------------------------------------ hooks for methods

    def configure_network(self) -> AdaptiveNetwork:
        raise NotImplementedError

    def compute_loss(self, output: Any, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Default: one classification loss on `forward_train`'s logits."""
        return self.criterion(output, target), {}

    def has_trained_weights(self) -> bool:
        """Whether evaluating without `--ckpt_path` makes sense (pretrained or `init_from`)."""
        return bool(self.backbone_spec.pretrained or self.hparams.init_from)

    def convert_foreign_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Tensor] | None:
        """Recognise another code base's checkpoint and return this network's state_dict."""
        return None

    def accepts_checkpoint_of(self, method: str) -> bool:
        """Whether `init_from` may take another method's checkpoint (MIA-Former takes a static one)."""
        return False

    def may_be_missing(self, key: str) -> bool:
        """Keys a method builds fresh when starting from another stage (e.g. a new controller)."""
        return False

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
        """Soft-target CE for mixup / label-smoothed targets (float), plain CE for class indices.
        Token labels (B, 1 + S², classes) are a method's to handle (`methods.token_labeling`)."""
        if target.ndim == 3:
            raise ValueError(
                f"{type(self).__name__} does not train with token labels (data.init_args.token_labels): "
                "StaticViTLitModule and CFViTLitModule do, with a backbone that has a token-labeling head "
                "(lvvit_s). Remove data.init_args.token_labels for this method."
            )
        if target.is_floating_point():
            return soft_target_cross_entropy(logits, target)
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
        """Per image: the predicted class, its confidence (max softmax), the exit that answered and
        the GFLOPs executed (written to the run folder by the `PredictionWriter` callback)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = self.net.forward_adaptive(x, self.net.exit_thresholds.tolist())
        confidence, prediction = out.logits.float().softmax(-1).max(-1)
        return {"prediction": prediction, "confidence": confidence, "exit": out.exit_index, "gflops": out.gflops}

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
        self.exit_policy.apply(strict=self.trainer.state.fn != "fit")
        self._aggregate_in_float32()

    def on_test_start(self) -> None:
        self.exit_policy.apply()
        self._aggregate_in_float32()

    def _aggregate_in_float32(self) -> None:
        """Keep the mean GFLOPs and the exit counts in float32. `precision: bf16-true` / `16-true`
        convert the whole module with `.to(dtype)`, metric states included (torchmetrics guards
        only `.half()`-style calls), and a bfloat16 sum stops growing by one at 256."""
        for metric in self.eval_metrics.modules():
            if isinstance(metric, BaseAggregator):
                metric.set_dtype(torch.float32)

    def on_predict_start(self) -> None:
        self.exit_policy.apply()

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

    # ------------------------------------------------------------------ checkpoints

    def configure_callbacks(self) -> list[Callback]:
        """Every fit resumes exactly, whatever callbacks the config lists."""
        return [ExactResume()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store which method wrote the checkpoint, and the calibrated budgets."""
        checkpoint["adaptive_vit"] = {"method": type(self).__name__, "calibrations": self.exit_policy.calibrations}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_saved_state(self, checkpoint)
