"""`StaticViTLitModule`: the plain backbone, the baseline every method is judged by."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from adaptive_vit.backbones import TrainHeads
from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.network import StaticViT
from adaptive_vit.methods.token_labeling import token_labeling_loss


class StaticViTLitModule(AdaptiveLitModule):
    """The configured backbone trained and evaluated with the DeiT recipe (one exit, fixed cost).

    With token labels (the data module's `token_labels`; a backbone with a token-labeling head,
    LV-ViT), as the TokenLabeling authors train LV-ViT (`TokenLabelCrossEntropy`): soft-target CE
    of the class head against the class token's target + `token_loss_weight` × soft-target CE of
    the token head against every grid cell's target (`methods.token_labeling`). Without them: CE on
    the prediction (for LV-ViT cls + 0.5·max of the token head, so that head gets a gradient too,
    which DDP needs), and a warning for a backbone with a token head.

    Args:
        token_loss_weight: weight of the token head's term with token labels (the authors'
            `--dense-weight`: 1.0 in their `main.py` and their LV-ViT-S command).
        **kwargs: `AdaptiveLitModule` arguments (backbone, lr, weight_decay, warm-up, init_from, ...).
    """

    def __init__(self, token_loss_weight: float = 1.0, **kwargs) -> None:
        if token_loss_weight < 0:
            raise ValueError(f"token_loss_weight must be >= 0 (got {token_loss_weight}); the authors use 1.0.")
        super().__init__(**kwargs)

    def configure_network(self) -> StaticViT:
        return StaticViT.from_spec(self.backbone_spec, self.hparams.num_classes)

    def compute_loss(self, output: TrainHeads, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if target.ndim == 3:  # token labels (B, 1 + S², classes): the class token, then every patch token
            cls, token = token_labeling_loss(output.class_logits, output.dense, target, self.backbone_spec.name,
                                             "img_size / patch_size")
            return cls + self.hparams.token_loss_weight * token, {"loss_cls": cls.detach(),
                                                                 "loss_token": token.detach()}
        if output.dense is not None:
            rank_zero_warn("training a backbone with a token-labeling head without token labels: plain CE on its "
                           "prediction (cls + dense_weight·max). The authors train LV-ViT with token labeling: "
                           "give the data module `token_labels` (see docs/lvvit.md).")
        return self.criterion(output.logits, target), {}
