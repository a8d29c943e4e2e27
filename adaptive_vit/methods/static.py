"""`StaticViTLitModule`: the plain timm backbone, the baseline every method is judged by."""

from __future__ import annotations

from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.network import StaticViT


class StaticViTLitModule(AdaptiveLitModule):
    """A timm ViT trained and evaluated with the DeiT recipe (one exit, fixed cost).

    Args:
        backbone: timm VisionTransformer name, e.g. ``deit_small_patch16_224``.
        pretrained: False, True (timm download) or a local weights file (works offline).
        img_size: input side (None: the backbone's default).
        patch_size: patch side (None: the backbone's default).
        drop_path_rate: stochastic depth.
        fused_attn: attention kernel: True fused SDPA, False explicit, None: the default, fused.
        vit_kwargs: further timm arguments, e.g. ``{embed_dim: 64, depth: 4, num_heads: 4}``.
        **kwargs: `AdaptiveLitModule` arguments (lr, weight_decay, warm-up, init_from, ...).
    """

    def __init__(
        self,
        backbone: str = "deit_small_patch16_224",
        pretrained: bool | str = False,
        img_size: int | None = None,
        patch_size: int | None = None,
        drop_path_rate: float = 0.1,
        fused_attn: bool | None = None,
        vit_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)

    def configure_network(self) -> StaticViT:
        hp = self.hparams
        return StaticViT.from_name(
            hp.backbone, pretrained=hp.pretrained, num_classes=hp.num_classes, img_size=hp.img_size,
            patch_size=hp.patch_size, drop_path_rate=hp.drop_path_rate, fused_attn=hp.fused_attn,
            **(hp.vit_kwargs or {}),
        )

    def has_trained_weights(self) -> bool:
        return bool(self.hparams.pretrained) or super().has_trained_weights()
