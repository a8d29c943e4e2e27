"""CF-ViT (Chen et al., AAAI 2023): coarse-to-fine ViT with informative re-splitting."""

from adaptive_vit.methods.cfvit.model import CFViT

__all__ = ["CFViT"]
