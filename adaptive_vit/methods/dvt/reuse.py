"""DVT's two ways for a downstream transformer to reuse its upstream one (docs/methods.md,
DVT: feature reuse, and DVT: relationship reuse).

- Feature reuse: each downstream block l gets f_l(upstream patch tokens) — LN(D) → Linear(D,128)
  → GELU → Linear(128,48) — resized to its own grid, a zero vector in the cls slot, and
  concatenated to the input of its MLP branch only (`ReuseBlock`).
- Relationship reuse: one shared MLP (1×1 convolutions H·L → 3·H·L → GELU → H·L) over the
  upstream's pre-softmax logits of all its layers, resized to the downstream token count and
  split into one additive attention term per downstream layer (`RelationReuse`).

Both resize a token grid the paper's way (Figure 5: nearest upsampling, ×2 unless the exit says
otherwise, then adaptive average pooling), the tokens with `resize.resize_tokens` and the relations with `resize.resize_relation`
(matmuls while training, one op with a compiled CPU kernel at inference); their FLOPs are
`resize.resize_flops` and `resize.resize_relation_flops`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from adaptive_vit.backbones import Block, Tap
from adaptive_vit.flops import norm_flops
from adaptive_vit.methods.dvt.resize import resize_flops, resize_relation, resize_relation_flops, resize_tokens


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
        upsampled: side of the nearest upsampling before the pooling (None: 2·upstream_grid).
    """

    def __init__(self, dim: int, upstream_grid: int, grid: int, hidden: int = 128, out_dim: int = 48,
                 eps: float = 1e-6, upsampled: int | None = None) -> None:
        super().__init__()
        self.upstream_grid, self.grid, self.out_dim, self.upsampled = upstream_grid, grid, out_dim, upsampled
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden, out_features=out_dim)

    def forward(self, upstream: Tensor) -> Tensor:
        """(B, Nu, D) upstream patch tokens (before its final norm) → (B, 1 + N, out_dim)."""
        features = resize_tokens(self.mlp(self.norm(upstream)), self.upstream_grid, self.grid, self.upsampled)
        cls = features.new_zeros(features.shape[0], 1, self.out_dim)
        return torch.cat([cls, features], dim=1)

    def flops(self) -> float:
        n, dim = self.upstream_grid ** 2, self.norm.normalized_shape[0]
        hidden = self.mlp.fc1.out_features
        return (norm_flops(n, dim) + n * dim * hidden + n * hidden * self.out_dim
                + resize_flops(self.out_dim, self.upstream_grid, self.grid))


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


def mix_channels(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1×1 convolution computed as one batched matmul over the flattened map: the same numbers,
    faster than the 1×1 convolution kernel on CPU on attention-logit maps.

    The bias is added in place after the matmul (autograd allows it: the matmul's backward does
    not read its output); `baddbmm` instead first copies the broadcast (1, C_out, 1) bias into its
    whole output, a strided copy that took most of its time on DeiT-S's (64, 216, 101, 101)
    hidden map on CPU (measured: docs/performance.md, DVT).

    Args:
        conv: a 1×1 `nn.Conv2d` (its weights).
        x: (B, C_in, ...).
    Returns:
        (B, C_out, ...).
    """
    batch, _, *spatial = x.shape
    weight = conv.weight.flatten(1).expand(batch, -1, -1)  # (B, C_out, C_in), a view
    return torch.bmm(weight, x.flatten(2)).add_(conv.bias[:, None]).unflatten(2, spatial)


class RelationReuse(nn.Module):
    """Upstream logits of all layers → one additive pre-softmax term per downstream layer.

    One MLP shared by all downstream layers (1×1 convolutions H·L → 3·H·L → GELU → H·L) runs at
    the upstream resolution; then the patch part is resized along the keys, then along the
    queries (grid reshape, nearest upsampling, adaptive average pooling); the cls row and column are not
    mixed with patches (each is only resized along the other axis; the cls/cls entry passes).

    Args:
        num_heads: heads per layer H (the same upstream and downstream).
        depth: layers L (the same upstream and downstream).
        upstream_grid: side of the upstream token grid.
        grid: side of this (downstream) model's token grid.
        upsampled: side of the nearest upsampling before the pooling (None: 2·upstream_grid).
    """

    def __init__(self, num_heads: int, depth: int, upstream_grid: int, grid: int,
                 upsampled: int | None = None) -> None:
        super().__init__()
        channels = num_heads * depth
        self.num_heads, self.upstream_grid, self.grid, self.upsampled = num_heads, upstream_grid, grid, upsampled
        self.mlp = nn.Sequential(nn.Conv2d(channels, 3 * channels, 1), nn.GELU(),
                                 nn.Conv2d(3 * channels, channels, 1))

    def forward(self, logits: Tensor) -> Iterator[Tensor]:
        """(B, H·L, 1+Nu, 1+Nu) upstream logits → L terms of (B, H, 1+N, 1+N), one per layer.

        The MLP runs once, at the upstream resolution; each layer's term is resized when the
        layer asks for it, so the (B, H·L, 1+N, 1+N) stack of all terms (715 MB for DeiT-S at
        batch 64) never exists at once: the memory traffic, not the FLOPs, was the cost on CPU.
        """
        relations = self.relate(logits)  # (B, HL, 1+Nu, 1+Nu)
        for relation in relations.split(self.num_heads, dim=1):
            yield resize_relation(relation, self.upstream_grid, self.grid, self.upsampled)  # (B, H, 1+N, 1+N)

    def relate(self, logits: Tensor) -> Tensor:
        """The shared MLP on every position: (B, H·L, n, n) → (B, H·L, n, n)."""
        first, act, second = self.mlp
        if torch.is_grad_enabled() or logits.device.type != "cpu":
            return mix_channels(second, act(mix_channels(first, logits)))
        # CPU inference: image by image through one reused hidden buffer. One image's (3HL, n²)
        # hidden map (8.8 MB for DeiT-S) stays in cache, where the whole batch's (564 MB at batch
        # 64) went to memory and back three times (matmul, GELU, matmul; docs/performance.md). The GELU
        # runs in place. (On a GPU the batched matmuls above are the fast way.) Weights in the
        # logits' dtype: under CPU autocast the logits are bfloat16, and `out=` is not autocast.
        w1, b1 = first.weight.flatten(1).to(logits.dtype), first.bias.to(logits.dtype)  # (3HL, HL)
        w2, b2 = second.weight.flatten(1).to(logits.dtype), second.bias.to(logits.dtype)  # (HL, 3HL)
        relations = torch.empty_like(logits, memory_format=torch.contiguous_format)
        hidden = logits.new_empty(w1.shape[0], logits[0, 0].numel())
        for image, relation in zip(logits, relations):
            torch.mm(w1, image.flatten(1), out=hidden).add_(b1[:, None])
            torch.ops.aten.gelu_(hidden, approximate=act.approximate)
            torch.mm(w2, hidden, out=relation.flatten(1)).add_(b2[:, None])
        return relations

    def flops(self) -> float:
        channels = self.mlp[0].in_channels
        n_up = self.upstream_grid ** 2 + 1
        return (n_up * n_up * 2 * channels * 3 * channels  # the two 1x1 convolutions
                + resize_relation_flops(channels, self.upstream_grid, self.grid))
