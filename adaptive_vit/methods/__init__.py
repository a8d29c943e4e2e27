"""The methods, each a LightningModule on its own plain `nn.Module` network."""

from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.static import StaticViTLitModule

__all__ = ["AdaptiveLitModule", "StaticViTLitModule"]
