"""`StaticViTLitModule`: the plain backbone, the baseline every method is judged by."""

from __future__ import annotations

from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.network import StaticViT


class StaticViTLitModule(AdaptiveLitModule):
    """The configured backbone trained and evaluated with the DeiT recipe (one exit, fixed cost).

    Its arguments are `AdaptiveLitModule`'s (backbone, lr, weight_decay, warm-up, init_from, ...).
    """

    def configure_network(self) -> StaticViT:
        return StaticViT.from_spec(self.backbone_spec, self.hparams.num_classes)
