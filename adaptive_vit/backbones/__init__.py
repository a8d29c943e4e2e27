"""Backbones: one `BackboneSpec` per model, built by the registered `BackboneFamily` that
handles its name (see `spec.py`). Families: timm ViTs (`timm_vit.py`), LV-ViT (`lvvit.py`), T2T-ViT
(`t2t_vit.py`), LeViT (`levit.py`)."""

from adaptive_vit.backbones.levit import LeViTFamily
from adaptive_vit.backbones.lvvit import LVViT, LVViTFamily
from adaptive_vit.backbones.spec import (
    BackboneDims,
    BackboneFamily,
    BackboneSpec,
    BackboneStage,
    TrainHeads,
    build_backbone,
    combine_heads,
    crop_regions,
    family_for,
    family_of,
    register_family,
)
from adaptive_vit.backbones.t2t_vit import T2TViT, T2TViTFamily
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
register_family(LVViTFamily())
register_family(T2TViTFamily())
register_family(LeViTFamily())

__all__ = [
    "Attention", "BackboneDims", "BackboneFamily", "BackboneSpec", "BackboneStage", "Block", "Tap", "TimmViTFamily",
    "LeViTFamily", "LVViT", "LVViTFamily", "T2TViT", "T2TViTFamily", "TrainHeads", "build_backbone", "combine_heads",
    "crop_regions", "create_vit",
    "family_for", "family_of", "register_family", "set_fused_attn", "vit_dims",
]
