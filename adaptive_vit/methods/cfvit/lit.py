"""`CFViTLitModule`: CF-ViT trained with the DeiT recipe, CE on the fine stage + KL coarse→fine."""

from __future__ import annotations

import re
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.cfvit.convert import convert_authors_checkpoint, is_authors_checkpoint
from adaptive_vit.methods.cfvit.model import CFViT


class CFViTLitModule(AdaptiveLitModule):
    """CF-ViT (coarse-to-fine ViT with informative re-splitting and early exit).

    Training always runs both stages: loss = CE(p_f, y) + KL(p_f.detach() ‖ p_c) (batchmean,
    T = 1). Before `selection_epoch` the fine stage re-splits every patch, from then on only the
    informative ones. Unlike the authors' DeiT code, the fine position embedding is added in both
    phases (theirs skips it in the first one, which leaves a parameter without gradient and
    breaks DDP).

    Args:
        backbone: timm ViT name with a cls token, e.g. ``deit_small_patch16_224``.
        pretrained: False, True (timm download) or a local weights file (works offline).
        coarse_grid: g, coarse tokens per side (7: 49 coarse / 124 fine tokens; 9: 81 / 204).
        img_size: full (fine) input side; None = 2·g·patch (224 for g=7 with 16-pixel patches).
        patch_size: patch side (None: the backbone's default).
        alpha: informative ratio α in (0, 1]: ⌈α·g²⌉ coarse patches are re-split.
        beta: EMA factor of the global class attention.
        cls_attn_start: first block (0-based) whose class attention enters the EMA.
        selection_epoch: first epoch (0-based) that trains with informative selection; earlier
            epochs re-split every patch (the authors: 200 of 300).
        kl_weight: weight of the KL term (the paper: 1). An ablation knob: 0 trains the fine
            stage alone (the coarse stage then learns only through the shared blocks).
        drop_path_rate: stochastic depth.
        fused_attn: attention kernel: True fused SDPA, False explicit, None: the default, fused.
        vit_kwargs: further timm arguments, e.g. ``{embed_dim: 64, depth: 4, num_heads: 4}``.
        **kwargs: `AdaptiveLitModule` arguments (lr, weight_decay, warm-up, init_from,
            thresholds, ...). ``init_from`` also takes the authors' released checkpoints.
    """

    def __init__(
        self,
        backbone: str = "deit_small_patch16_224",
        pretrained: bool | str = False,
        coarse_grid: int = 7,
        img_size: int | None = None,
        patch_size: int | None = None,
        alpha: float = 0.5,
        beta: float = 0.99,
        cls_attn_start: int = 3,
        selection_epoch: int = 200,
        kl_weight: float = 1.0,
        drop_path_rate: float = 0.1,
        fused_attn: bool | None = None,
        vit_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0 (got {kl_weight}); the paper uses 1.")
        super().__init__(**kwargs)

    def configure_network(self) -> CFViT:
        hp = self.hparams
        net = CFViT.from_name(
            hp.backbone, alpha=hp.alpha, beta=hp.beta, cls_attn_start=hp.cls_attn_start,
            pretrained=hp.pretrained, num_classes=hp.num_classes, img_size=self._full_size(),
            patch_size=hp.patch_size, drop_path_rate=hp.drop_path_rate, fused_attn=hp.fused_attn,
            **(hp.vit_kwargs or {}),
        )
        if net.coarse_grid != hp.coarse_grid:
            raise ValueError(
                f"coarse_grid={hp.coarse_grid} but img_size={net.input_size()[1]} with "
                f"{net.vit.patch_embed.patch_size[0]}-pixel patches gives a {net.coarse_grid}×"
                f"{net.coarse_grid} coarse grid: set img_size to 2·coarse_grid·patch_size "
                f"({2 * hp.coarse_grid * net.vit.patch_embed.patch_size[0]}) or leave it unset."
            )
        return net

    def _full_size(self) -> int:
        """img_size, or 2·g·patch when unset (the patch side from patch_size or the name)."""
        hp = self.hparams
        if hp.img_size is not None:
            return hp.img_size
        match = re.search(r"patch(\d+)", hp.backbone)
        patch = hp.patch_size or (int(match.group(1)) if match else None)
        if patch is None:
            raise ValueError(f"cannot tell the patch size of {hp.backbone!r}: set img_size (2·coarse_grid·patch).")
        return 2 * hp.coarse_grid * patch

    def on_train_epoch_start(self) -> None:
        self.net.train_split_all = self.current_epoch < self.hparams.selection_epoch

    def compute_loss(self, output: tuple[Tensor, Tensor], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        coarse, fine = output
        ce = self.criterion(fine, target)
        # KL(p_f ‖ p_c): the fine prediction teaches the coarse one and gets no gradient from it.
        kl = F.kl_div(F.log_softmax(coarse.float(), -1), F.softmax(fine.detach().float(), -1),
                      reduction="batchmean")
        return ce + self.hparams.kl_weight * kl, {"loss_ce": ce.detach(), "loss_kl": kl.detach()}

    def has_trained_weights(self) -> bool:
        return bool(self.hparams.pretrained) or super().has_trained_weights()

    def convert_foreign_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Tensor] | None:
        if not is_authors_checkpoint(checkpoint):
            return None
        return convert_authors_checkpoint(checkpoint, self.net)

