"""Backbones: one `BackboneSpec` per model, built by the registered `BackboneFamily` that
handles its name (see `spec.py`). Families: timm ViTs (`timm_vit.py`)."""

from adaptive_vit.backbones.spec import (
    BackboneDims,
    BackboneFamily,
    BackboneSpec,
    build_backbone,
    family_for,
    family_of,
    register_family,
)
from adaptive_vit.backbones.timm_vit import (
    Attention,
    Block,
    Tap,
    TimmViTFamily,
    create_vit,
    set_fused_attn,
    vit_dims,
)

register_family(TimmViTFamily())
from adaptive_vit.backbones.t2t_vit import T2TViTFamily  # noqa: E402 (uses Block above)

register_family(T2TViTFamily())

__all__ = [
    "Attention", "BackboneDims", "BackboneFamily", "BackboneSpec", "Block", "Tap", "TimmViTFamily",
    "build_backbone", "create_vit", "family_for", "family_of", "register_family", "set_fused_attn", "vit_dims",
]
