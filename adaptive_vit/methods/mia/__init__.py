"""MIA-Former: skip blocks, heads and tokens per image with a light controller (docs/methods.md, "MIA-Former")."""

from adaptive_vit.methods.mia.model import Decisions, MIAFormer  # noqa: F401
