"""`CFViTLitModule`: CF-ViT trained with the DeiT recipe, CE on the fine stage + KL coarse→fine."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from adaptive_vit.backbones import build_backbone, family_for
from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.cfvit.convert import convert_authors_checkpoint, is_authors_checkpoint
from adaptive_vit.methods.cfvit.model import CFViT, TrainOutput
from adaptive_vit.methods.token_labeling import token_labeling_loss


class CFViTLitModule(AdaptiveLitModule):
    """CF-ViT (coarse-to-fine ViT with informative re-splitting and early exit).

    Training always runs both stages: loss = CE(p_f, y) + KL(p_f.detach() ‖ p_c) (batchmean,
    T = 1). With token labels (the data module's `token_labels`, a backbone with a token head such
    as LV-ViT), as the authors train it: CE of the fine class head against the class-token target
    + CE of the fine token head against every fine-grid cell's target + KL between the stages'
    class heads. Before `selection_epoch` the fine stage re-splits every patch, from then on only the
    informative ones. Unlike the authors' DeiT code, the fine position embedding is added in both
    phases (theirs skips it in the first one, which leaves a parameter without gradient and
    breaks DDP).

    Args:
        coarse_grid: g, coarse tokens per side (7: 49 coarse / 124 fine tokens; 9: 81 / 204). The
            backbone's img_size is the full (fine) input side; unset, it is 2·g·patch (224 for
            g=7 with 16-pixel patches).
        alpha: informative ratio α in (0, 1]: ⌈α·g²⌉ coarse patches are re-split.
        beta: EMA factor of the global class attention.
        cls_attn_start: first block (0-based) whose class attention enters the EMA.
        selection_epoch: first epoch (0-based) that trains with informative selection; earlier
            epochs re-split every patch (the authors: 200 of 300).
        kl_weight: weight of the KL term (the paper: 1). An ablation knob: 0 trains the fine
            stage alone (the coarse stage then learns only through the shared blocks).
        dense_weight: backbones with a token-labeling head (LV-ViT) only: the weight of its
            maximum over tokens in each stage's prediction (the authors: 0.25; see `CFViT`).
        **kwargs: `AdaptiveLitModule` arguments (backbone, lr, weight_decay, warm-up, init_from,
            thresholds, ...). ``init_from`` also takes the authors' released checkpoints.
    """

    def __init__(
        self,
        coarse_grid: int = 7,
        alpha: float = 0.5,
        beta: float = 0.99,
        cls_attn_start: int = 3,
        selection_epoch: int = 200,
        kl_weight: float = 1.0,
        dense_weight: float = 0.25,
        **kwargs,
    ) -> None:
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0 (got {kl_weight}); the paper uses 1.")
        super().__init__(**kwargs)

    def configure_network(self) -> CFViT:
        hp = self.hparams
        spec = self.backbone_spec.with_(img_size=self._full_size())
        vit, _ = build_backbone(spec, hp.num_classes)
        net = CFViT(vit, alpha=hp.alpha, beta=hp.beta, cls_attn_start=hp.cls_attn_start,
                    dense_weight=hp.dense_weight)
        if net.coarse_grid != hp.coarse_grid:
            patch = net.family.dims(vit).patch_size
            raise ValueError(
                f"coarse_grid={hp.coarse_grid} but img_size={net.input_size()[1]} with "
                f"{patch}-pixel patches gives a {net.coarse_grid}×{net.coarse_grid} coarse grid: set "
                f"backbone.img_size to 2·coarse_grid·patch_size ({2 * hp.coarse_grid * patch}) or leave it unset."
            )
        return net

    def _full_size(self) -> int:
        """backbone.img_size, or 2·g·patch when unset (the patch side from patch_size or the family)."""
        spec = self.backbone_spec
        if spec.img_size is not None:
            return spec.img_size
        patch = spec.patch_size or family_for(spec.name).default_patch_size(spec.name)
        if patch is None:
            raise ValueError(
                f"cannot tell the patch size of {spec.name!r}: set backbone.img_size (2·coarse_grid·patch)."
            )
        return 2 * self.hparams.coarse_grid * patch

    def on_train_epoch_start(self) -> None:
        self.net.train_split_all = self.current_epoch < self.hparams.selection_epoch

    def compute_loss(self, output: TrainOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logs: dict[str, Tensor] = {}
        if target.ndim == 3:  # token labels (B, 1 + S², classes): the class token, then every patch token
            coarse, fine = output.coarse_class, output.fine_class
            # the fine stage's class head and token head (on the fine grid), dense weight 1 (theirs)
            cls, token = token_labeling_loss(fine, output.fine_dense, target, self.backbone_spec.name,
                                             "2·coarse_grid")
            ce = cls + token
            logs["loss_token"] = token.detach()
        else:
            if output.fine_dense is not None:
                rank_zero_warn("CF-ViT: training a backbone with a token-labeling head without token labels: "
                               "plain CE on each stage's prediction (cls + dense_weight·max). The authors train "
                               "with token labeling: give the data module `token_labels` (see docs/lvvit.md).")
            coarse, fine = output.coarse, output.fine
            ce = self.criterion(fine, target)
        # KL(p_f ‖ p_c): the fine prediction teaches the coarse one and gets no gradient from it.
        kl = F.kl_div(F.log_softmax(coarse.float(), -1), F.softmax(fine.detach().float(), -1),
                      reduction="batchmean")
        return ce + self.hparams.kl_weight * kl, {**logs, "loss_ce": ce.detach(), "loss_kl": kl.detach()}

    def convert_foreign_checkpoint(self, checkpoint: dict[str, Any]) -> dict[str, Tensor] | None:
        if not is_authors_checkpoint(checkpoint):
            return None
        return convert_authors_checkpoint(checkpoint, self.net)

