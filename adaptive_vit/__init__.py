"""adaptive-vit: input-adaptive Vision Transformers (MIA-Former, DVT, CF-ViT) on PyTorch Lightning."""

__version__ = "0.1.0"
