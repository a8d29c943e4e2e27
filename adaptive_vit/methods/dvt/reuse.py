"""DVT's two ways for a downstream transformer to reuse its upstream one (METHODS.md, "DVT").

- Feature reuse: each downstream block l gets f_l(upstream patch tokens) — LN(D) → Linear(D,128)
  → GELU → Linear(128,48) — resized to its own grid, a zero vector in the cls slot, and
  concatenated to the input of its MLP branch only (`ReuseBlock`).
- Relationship reuse: one shared MLP (1×1 convolutions H·L → 3·H·L → GELU → H·L) over the
  upstream's pre-softmax logits of all its layers, resized to the downstream token count and
  split into one additive attention term per downstream layer (`RelationReuse`).

Both resize a token grid the paper's way (Figure 5): nearest ×2 upsampling, then adaptive average
pooling to the target grid (naive upsampling hurts, paper Table 8).

FLOPs follow fvcore's count of what runs here (so analytic costs equal fvcore's): upsampling
counts one FLOP per element written, adaptive pooling one per element read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from adaptive_vit.backbones import Block, Tap
from adaptive_vit.flops import norm_flops


def resize_grid(x: Tensor, size: int) -> Tensor:
    """Resize a square map to `size`×`size`: nearest ×2 upsampling, then adaptive average pooling.

    Args:
        x: (B, C, g, g).
        size: target side.
    Returns:
        (B, C, size, size).
    """
    return F.adaptive_avg_pool2d(F.interpolate(x, scale_factor=2, mode="nearest"), size)


def resize_flops(channels: int, grid: int) -> float:
    """fvcore's count of `resize_grid` on (channels, grid, grid): upsample writes + pool reads."""
    return 2 * channels * (2 * grid) ** 2


def resize_tokens(tokens: Tensor, grid: int, size: int) -> Tensor:
    """Resize patch tokens laid out row-major on a `grid`×`grid` map to `size`×`size`.

    Args:
        tokens: (..., grid², C).
        grid: side of the input grid.
        size: side of the output grid.
    Returns:
        (..., size², C).
    """
    *lead, n, c = tokens.shape
    assert n == grid * grid, f"{n} tokens do not form a {grid}x{grid} grid"
    maps = tokens.reshape(-1, grid, grid, c).permute(0, 3, 1, 2)  # (B', C, g, g)
    maps = resize_grid(maps, size)  # (B', C, s, s)
    return maps.permute(0, 2, 3, 1).reshape(*lead, size * size, c)


def resize_keys(logits: Tensor, grid: int, size: int) -> Tensor:
    """Resize the patch keys (last axis) of attention logits; the cls key column is kept as is.

    Args:
        logits: (B, C, Q, 1 + grid²).
    Returns:
        (B, C, Q, 1 + size²).
    """
    b, c, q, _ = logits.shape
    patches = logits[..., 1:].reshape(b, c * q, grid, grid)  # every query row is one map
    patches = resize_grid(patches, size).reshape(b, c, q, size * size)
    return torch.cat([logits[..., :1], patches], dim=-1)


class FeatureReuse(nn.Module):
    """f_l: LN(D) → Linear(D, hidden) → GELU → Linear(hidden, out), at the upstream resolution,
    then resized to the downstream grid with a zero cls slot.

    Args:
        dim: token width D of the upstream model.
        upstream_grid: side of the upstream token grid.
        grid: side of this (downstream) model's token grid.
        hidden: hidden width (128 in the paper).
        out_dim: reused channels (48 in the paper).
        eps: LayerNorm epsilon (the backbone's).
    """

    def __init__(self, dim: int, upstream_grid: int, grid: int, hidden: int = 128, out_dim: int = 48,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.upstream_grid, self.grid, self.out_dim = upstream_grid, grid, out_dim
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden, out_features=out_dim)

    def forward(self, upstream: Tensor) -> Tensor:
        """(B, Nu, D) upstream patch tokens (before its final norm) → (B, 1 + N, out_dim)."""
        features = resize_tokens(self.mlp(self.norm(upstream)), self.upstream_grid, self.grid)
        cls = features.new_zeros(features.shape[0], 1, self.out_dim)
        return torch.cat([cls, features], dim=1)

    def flops(self) -> float:
        n, dim = self.upstream_grid ** 2, self.norm.normalized_shape[0]
        hidden = self.mlp.fc1.out_features
        return (norm_flops(n, dim) + n * dim * hidden + n * hidden * self.out_dim
                + resize_flops(self.out_dim, self.upstream_grid))


class ReuseBlock(Block):
    """A transformer block whose MLP branch also reads the reused upstream features:
    z = z' + MLP(LN(concat(z', E_l))), LN over D+48, fc1 taking D+48 inputs, fc2 writing D.

    It adopts the modules of a block built by `create_vit` (attention, norm1, drop path, layer
    scale: pretrained weights and the drop-path schedule carry over) rather than re-deriving
    timm's constructor arguments; norm2 and fc1 are widened, their first D entries copied.
    The attention keeps `attn_mask` (relationship reuse) and `tap` ("logits" for a downstream).

    Args:
        block: a built `backbones.Block`.
        reuse: this block's feature-reuse module f_l.
    """

    def __init__(self, block: Block, reuse: FeatureReuse) -> None:
        nn.Module.__init__(self)  # adopt `block`'s children instead of timm's constructor
        for name, module in block.named_children():
            setattr(self, name, module)
        self.norm2 = _widen_norm(block.norm2, reuse.out_dim)
        self.mlp = _widen_mlp(block.mlp, reuse.out_dim)
        self.feature_reuse = reuse

    def forward(
        self,
        x: Tensor,
        upstream: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        tap: Tap = None,
        **kwargs,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, 1+N, D); upstream: (B, Nu, D) upstream patch tokens before its final norm."""
        if upstream is None:
            raise ValueError("ReuseBlock needs the upstream model's patch tokens (`upstream=`).")
        out = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, tap=tap)
        y, extra = out if tap is not None else (out, None)
        x = x + self.drop_path1(self.ls1(y))
        reused = self.feature_reuse(upstream).to(x.dtype)  # (B, 1+N, 48), zero for cls
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(torch.cat([x, reused], dim=-1)))))
        return x if tap is None else (x, extra)

    def flops(self, tokens: int) -> float:
        """Extra cost over the plain block: wider norm2 and fc1, plus f_l."""
        extra = self.feature_reuse.out_dim
        wider = norm_flops(tokens, extra) + tokens * extra * self.mlp.fc1.out_features
        return wider + self.feature_reuse.flops()


def _widen_norm(norm: nn.LayerNorm, extra: int) -> nn.LayerNorm:
    wide = type(norm)(norm.normalized_shape[0] + extra, eps=norm.eps)
    with torch.no_grad():
        wide.weight[: norm.weight.shape[0]] = norm.weight
        wide.bias[: norm.bias.shape[0]] = norm.bias
    return wide


def _widen_mlp(mlp: Mlp, extra: int) -> Mlp:
    """The same MLP with `extra` more inputs (appended after the D channels, as the authors' concat)."""
    dim, hidden = mlp.fc1.in_features, mlp.fc1.out_features
    wide = type(mlp)(dim + extra, hidden, out_features=mlp.fc2.out_features, act_layer=type(mlp.act),
                     drop=mlp.drop1.p)
    with torch.no_grad():
        nn.init.trunc_normal_(wide.fc1.weight, std=0.02)  # timm's ViT init for the new inputs
        wide.fc1.weight[:, :dim] = mlp.fc1.weight
        wide.fc1.bias.copy_(mlp.fc1.bias)
    wide.fc2 = mlp.fc2
    return wide


class RelationReuse(nn.Module):
    """Upstream logits of all layers → one additive pre-softmax term per downstream layer.

    One MLP shared by all downstream layers (1×1 convolutions H·L → 3·H·L → GELU → H·L) runs at
    the upstream resolution; then the patch part is resized along the keys, then along the
    queries (grid reshape, nearest ×2, adaptive average pooling); the cls row and column are not
    mixed with patches (each is only resized along the other axis; the cls/cls entry passes).

    Args:
        num_heads: heads per layer H (the same upstream and downstream).
        depth: layers L (the same upstream and downstream).
        upstream_grid: side of the upstream token grid.
        grid: side of this (downstream) model's token grid.
    """

    def __init__(self, num_heads: int, depth: int, upstream_grid: int, grid: int) -> None:
        super().__init__()
        channels = num_heads * depth
        self.num_heads, self.upstream_grid, self.grid = num_heads, upstream_grid, grid
        self.mlp = nn.Sequential(nn.Conv2d(channels, 3 * channels, 1), nn.GELU(),
                                 nn.Conv2d(3 * channels, channels, 1))

    def forward(self, logits: Tensor) -> list[Tensor]:
        """(B, H·L, 1+Nu, 1+Nu) upstream logits → L terms of (B, H, 1+N, 1+N)."""
        relations = self.mlp(logits)
        relations = resize_keys(relations, self.upstream_grid, self.grid)  # (B, HL, 1+Nu, 1+N)
        relations = resize_keys(relations.transpose(-1, -2), self.upstream_grid, self.grid)
        return list(relations.transpose(-1, -2).split(self.num_heads, dim=1))

    def flops(self) -> float:
        channels = self.mlp[0].in_channels
        n_up, n = self.upstream_grid ** 2 + 1, self.grid ** 2 + 1
        return (n_up * n_up * 2 * channels * 3 * channels  # the two 1x1 convolutions
                + resize_flops(channels * n_up, self.upstream_grid)  # along keys, every query row
                + resize_flops(channels * n, self.upstream_grid))  # along queries, every key column
