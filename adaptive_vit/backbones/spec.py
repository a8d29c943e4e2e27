"""A backbone is one thing: `BackboneSpec` (what a config says) and `BackboneFamily` (how an
architecture is built and what the methods may ask of it).

Every LightningModule takes one `backbone` argument, nested by jsonargparse:

    model:
      init_args:
        backbone: {name: deit_small_patch16_224, pretrained: /path/to/weights.pth, img_size: 224}

`build_backbone(spec, num_classes)` finds the family that handles `spec.name` and builds the
model. A family is one module: subclass `BackboneFamily`, fill in its methods, and
`register_family(MyFamily())`; the methods (static, CF-ViT, DVT, MIA-Former) only ever talk to a
backbone through its family (see docs/backbones.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from adaptive_vit.flops import patch_embed_flops


@dataclass
class BackboneSpec:
    """The backbone of a model, as a config gives it.

    Args:
        name: architecture name, e.g. ``deit_small_patch16_224`` (any timm VisionTransformer).
        pretrained: False; True (download through timm: needs a network); or the path of a local
            weights file in the family's layout (works offline).
        img_size: input side (None: the architecture's default; some methods set it).
        patch_size: patch side (None: the architecture's default; some methods set it).
        drop_path_rate: stochastic depth rate.
        fused_attn: attention kernel: True fused SDPA, False explicit matmuls, None: the default.
        kwargs: further architecture arguments, e.g. ``{embed_dim: 64, depth: 4, num_heads: 4}``.
    """

    name: str = "deit_small_patch16_224"
    pretrained: bool | str = False
    img_size: int | None = None
    patch_size: int | None = None
    drop_path_rate: float = 0.1
    fused_attn: bool | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> BackboneSpec:
        """A copy with some fields set by the method (e.g. DVT's per-exit patch size)."""
        return replace(self, **changes)


class BackboneDims(NamedTuple):
    """The numbers a method and its cost formulas need of a built backbone."""

    dim: int  # token width D
    depth: int  # transformer blocks L
    num_heads: int  # attention heads H
    mlp_hidden: int  # MLP hidden width M
    grid: tuple[int, int]  # patch tokens per side at the configured image size
    num_prefix_tokens: int  # class (and other) tokens before the patch tokens
    patch_size: int  # pixels per token side
    in_chans: int  # image channels
    num_classes: int  # classifier outputs

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def as_dict(self) -> dict[str, int]:
        """The cost formulas' keyword arguments (`adaptive_vit.flops`): no grid, its token count."""
        d = {k: v for k, v in self._asdict().items() if k != "grid"}
        return {**d, "num_patches": self.num_patches}


class TrainHeads(NamedTuple):
    """A whole backbone's training forward: its prediction and, for a backbone with a token-labeling
    head, both heads apart (token labeling trains each against its own target)."""

    logits: Tensor  # (B, classes) the prediction, what the model's forward returns
    class_logits: Tensor  # (B, classes) the class head alone (= logits without a token head)
    dense: Tensor | None  # (B, N, classes) the token head on every patch token; None without one


class BackboneStage(NamedTuple):
    """Blocks at one token shape, for methods that adapt block by block (MIA-Former).

    `entry` always runs first (LeViT's attention-subsample block between stages; None: nothing),
    then `blocks`, each taking and returning (B, P + N, D) tokens: P prefix (class) tokens, then
    the N = rows·cols patch tokens of `grid` in row-major order.
    """

    entry: nn.Module | None
    blocks: nn.Sequential
    dim: int  # D
    num_heads: int  # H
    grid: tuple[int, int]  # (rows, cols) of the patch tokens
    num_prefix_tokens: int  # P


class BackboneFamily:
    """How one architecture is built, and what the methods ask of a built model.

    The methods see a backbone as: a tokenizer (image → patch tokens), a class token and position
    embeddings (at the model's grid; a method resamples them for other grids), a stack of
    pre-norm transformer blocks that accept `tap=` (see `backbones.timm_vit.Block`), a final norm
    and a classifier head, and the FLOPs of the whole.

    Subclasses fill in `handles`, `create`, `dims`, `tokenize` and `gflops`. The other methods
    have defaults for a model laid out as timm's `VisionTransformer` (attributes `cls_token`,
    `pos_embed`, `pos_drop`, `blocks`, `norm`, `head`): override those that differ.
    """

    name: str = ""
    model_class: type[nn.Module] = nn.Module  # what `create` builds

    def handles(self, name: str) -> bool:
        """Whether this family builds architecture `name`."""
        raise NotImplementedError

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` is one of this family's."""
        return isinstance(model, self.model_class)

    def create(self, spec: BackboneSpec, num_classes: int) -> nn.Module:
        """Build the model of `spec` with a `num_classes`-way classifier (weights loaded)."""
        raise NotImplementedError

    def dims(self, model: nn.Module) -> BackboneDims:
        raise NotImplementedError

    def tokenize(self, model: nn.Module, x: Tensor) -> Tensor:
        """Images (B, C, H, W) → patch tokens (B, N, D), no position yet; any H, W the tokenizer
        takes (CF-ViT also embeds the half-size image and 2×2-patch crops)."""
        raise NotImplementedError

    def default_patch_size(self, name: str) -> int | None:
        """The patch side of architecture `name` when the config leaves it unset (None: unknown).
        Default: read off the name (``..._patch16_...``)."""
        match = re.search(r"patch(\d+)", name)
        return int(match.group(1)) if match else None

    def tokenize_regions(self, model: nn.Module, x: Tensor, grid: int, regions: Tensor) -> Tensor:
        """The patch tokens of some regions of a grid×grid partition of the images: (B, k, T, D),
        T tokens per region in row-major order (CF-ViT's re-split: T = 4).

        Default: each region's crop goes through `tokenize` on its own, exact for a tokenizer
        that reads each patch alone (a patch-sized convolution). A tokenizer whose receptive
        field crosses patch borders overrides this.

        Args:
            model: the backbone.
            x: (B, C, H, W) images.
            grid: regions per side.
            regions: (B, k) region indices (row-major) per image.
        """
        tokens = self.tokenize(model, crop_regions(x, grid, regions))  # (B*k, T, D)
        return tokens.reshape(*regions.shape, *tokens.shape[1:])

    def tokenize_flops(self, model: nn.Module, height: int, width: int) -> float:
        """FLOPs of `tokenize` on one H×W image. Default: a patch-sized linear projection."""
        d = self.dims(model)
        patches = (height // d.patch_size) * (width // d.patch_size)
        return patch_embed_flops(patches, d.dim, d.patch_size, d.in_chans)

    def tokenize_regions_flops(self, model: nn.Module, height: int, width: int, grid: int, count: int) -> float:
        """FLOPs of `tokenize_regions` for `count` regions of one H×W image."""
        return count * self.tokenize_flops(model, height // grid, width // grid)

    def cls_token(self, model: nn.Module) -> Tensor:
        """(1, 1, D)."""
        return model.cls_token

    def pos_embed(self, model: nn.Module) -> Tensor:
        """(1, 1 + N, D): the class token's position embedding, then the patch grid's."""
        return model.pos_embed

    def pre_blocks(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """What runs on the assembled tokens (B, 1 + N, D) before the first block (dropout,
        pre-norm; often nothing)."""
        return model.pos_drop(tokens)

    def embed(self, model: nn.Module, x: Tensor) -> Tensor:
        """Images → the first block's input (B, 1 + N, D): class token, tokens, positions, then
        `pre_blocks`."""
        tokens = self.tokenize(model, x)
        cls = self.cls_token(model).expand(tokens.shape[0], -1, -1)
        return self.pre_blocks(model, torch.cat([cls, tokens], 1) + self.pos_embed(model))

    def blocks(self, model: nn.Module) -> nn.Sequential:
        return model.blocks

    def stages(self, model: nn.Module) -> list[BackboneStage]:
        """The blocks as stages (what runs between `embed` and `norm`). Default: one stage, the
        `blocks` at the `dims` width, heads and grid, with no entry."""
        d = self.dims(model)
        return [BackboneStage(None, self.blocks(model), d.dim, d.num_heads, d.grid, d.num_prefix_tokens)]

    def norm(self, model: nn.Module) -> nn.Module:
        """The final norm (its `eps` also sizes methods' extra norms)."""
        return model.norm

    def head(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """Tokens after the final norm (B, 1 + N, D) → logits (B, classes), from the class token."""
        return model.head(tokens[:, 0])

    def dense_head(self, model: nn.Module, tokens: Tensor) -> Tensor | None:
        """Per-patch-token logits (B, N, classes) of a token-labeling head (LV-ViT's ``aux_head``)
        from the normed tokens (B, 1 + N, D); None for a backbone without one (default)."""
        return None

    def train_heads(self, model: nn.Module, x: Tensor) -> TrainHeads:
        """The whole model on images (B, C, H, W), for training the static backbone. Default: its
        forward is the class head's prediction, and there is no token head."""
        logits = model(x)
        return TrainHeads(logits, logits, None)

    def head_flops(self, model: nn.Module, tokens: int) -> float:
        """FLOPs of `head` (and `dense_head`) on a sequence of `tokens` tokens (class token
        included). Default: one linear classifier on the class token."""
        d = self.dims(model)
        return d.dim * d.num_classes

    def gflops(self, model: nn.Module) -> float:
        """GFLOPs per image of the whole model (the project's convention, `adaptive_vit.flops`)."""
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        d = self.dims(model)
        return (d.in_chans, d.grid[0] * d.patch_size, d.grid[1] * d.patch_size)


def combine_heads(cls_logits: Tensor, dense_logits: Tensor, weight: float, scale: float = 1.0) -> Tensor:
    """(cls + weight·max_n dense_n) / scale: a class head and a token-labeling head as one
    prediction (LV-ViT: weight 0.5; CF-ViT's coarse stage weight 0.25, scale 1.25).

    Args:
        cls_logits: (B, classes).
        dense_logits: (B, N, classes).
        weight: weight of the token head's maximum over the tokens.
        scale: divisor of the sum.
    """
    return (cls_logits + weight * dense_logits.amax(1)) / scale


def crop_regions(x: Tensor, grid: int, regions: Tensor) -> Tensor:
    """Crops of some regions of a grid×grid partition of feature maps or images.

    Args:
        x: (B, C, H, W), H and W multiples of `grid`.
        grid: regions per side.
        regions: (B, k) region indices (row-major) per image.

    Returns:
        (B·k, C, H/grid, W/grid), image by image.
    """
    B, C, H, W = x.shape
    h, w = H // grid, W // grid
    tiles = x.reshape(B, C, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, h, w)
    rows = torch.arange(B, device=x.device)[:, None]
    return tiles[rows, regions // grid, regions % grid].reshape(-1, C, h, w)


_FAMILIES: list[BackboneFamily] = []


def register_family(family: BackboneFamily) -> BackboneFamily:
    """Make `family` available to every config (later registrations are asked first)."""
    _FAMILIES.insert(0, family)
    return family


def family_for(name: str) -> BackboneFamily:
    """The registered family that builds `name`."""
    for family in _FAMILIES:
        if family.handles(name):
            return family
    known = ", ".join(f.name for f in _FAMILIES)
    raise ValueError(
        f"unknown backbone {name!r}: no registered backbone family builds it (families: {known}). "
        "See docs/backbones.md for the names each family takes."
    )


def build_backbone(spec: BackboneSpec, num_classes: int) -> tuple[nn.Module, BackboneFamily]:
    """The model of `spec` and the family that answers for it."""
    family = family_for(spec.name)
    return family.create(spec, num_classes), family


def family_of(model: nn.Module) -> BackboneFamily:
    """The family of a built model (asked by the networks when given a model directly)."""
    for family in _FAMILIES:
        if family.owns(model):
            return family
    raise ValueError(f"{type(model).__name__} is not a backbone of any registered family.")


# Before the backbone became one group, each LightningModule took these flat arguments.
_FLAT_BACKBONE_KEYS = {"backbone": "name", "pretrained": "pretrained", "img_size": "img_size",
                       "patch_size": "patch_size", "drop_path_rate": "drop_path_rate",
                       "fused_attn": "fused_attn", "vit_kwargs": "kwargs"}


def check_backbone_spelling(init_args: dict[str, Any], own_args: set[str], source: str) -> None:
    """Refuse a model config in the old flat spelling (``backbone: deit_small_patch16_224``,
    ``img_size``, ``vit_kwargs``... beside the method's arguments), showing the new one.

    Args:
        init_args: the config's ``model.init_args``.
        own_args: the arguments the configured LightningModule takes itself (DVT keeps its
            own ``img_size``).
        source: where the config comes from, for the message.
    """
    flat = {k: v for k, v in init_args.items()
            if k in _FLAT_BACKBONE_KEYS and (isinstance(v, str) if k == "backbone" else k not in own_args)}
    if not flat:
        return
    group = {_FLAT_BACKBONE_KEYS[k]: v for k, v in flat.items()}
    lines = "\n".join(f"      {k}: {json.dumps(v)}" for k, v in group.items())  # JSON values are YAML
    raise ValueError(
        f"{source}: the backbone arguments are one group now. Replace model.init_args."
        f"{', model.init_args.'.join(flat)} with\n    backbone:\n{lines}\n(on the command line: "
        "--model.init_args.backbone.name ..., --model.init_args.backbone.kwargs ...; see docs/backbones.md)."
    )
