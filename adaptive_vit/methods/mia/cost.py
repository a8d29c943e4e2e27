"""Analytic FLOPs of MIA-Former per image, from its decisions (docs/methods.md, MIA-Former: cost).

Per executed block with n tokens (cls included) and h active heads: norm1 + norm2 on n tokens,
qkv n·D·3hE, attention 2n²hE, proj n·hE·D (`flops.attention_flops`), MLP 2·n·hE·(h/H)M
(`flops.mlp_flops` with fraction h/H), plus every executed controller part. The same arithmetic
works on floats and on tensors, so with straight-through masks the cost is differentiable.

Controller parts, counted as fvcore counts them (a test checks): the 4×4 average pool is a
(16, N) @ (N, D) matmul (see controller.py), the two 3×3 convolutions count every kernel tap at
every pooled position plus the (16, 144) @ (144, D/4) matmul that sums each position's taps
(`RowConv3x3`), means and activations count 0.
The block part (pool, CNN_b, FC_b) runs before every block for every image; the head and token
branches only for images that execute the block (the paper: skipping a block spares computing its
head and token policies). Critic heads run only in training and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from adaptive_vit.flops import attention_flops, mlp_flops, norm_flops, patch_embed_flops
from adaptive_vit.methods.mia.controller import MIAController

Number = float | Tensor


@dataclass(frozen=True)
class MIACost:
    """FLOPs of one MIA-Former configuration.

    Args:
        dim: D. depth: L. num_heads: H. mlp_hidden: M. num_patches: N. patch_size, in_chans,
        num_classes: for the stem and the classifier.
        controller_block: FLOPs of a controller's always-run part (pool, CNN_b, FC_b).
        controller_branches: FLOPs of its head and token branches (run when the block runs).
    """

    dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_patches: int
    patch_size: int
    in_chans: int
    num_classes: int
    controller_block: float
    controller_branches: float

    @classmethod
    def of(cls, dims: dict[str, int], controller: MIAController) -> MIACost:
        """From `backbones.vit_dims(backbone)` and one controller (all controllers are alike)."""
        block, branches = controller_flops(controller, dims["num_patches"])
        keys = ("dim", "depth", "num_heads", "mlp_hidden", "num_patches", "patch_size", "in_chans", "num_classes")
        return cls(**{k: dims[k] for k in keys}, controller_block=block, controller_branches=branches)

    def block(self, tokens: Number, heads: Number) -> Number:
        """One MIA-Block on `tokens` tokens (cls included) with `heads` active heads."""
        d, h = self.dim, self.num_heads
        # with no active head nothing is normalised (see block.py: only the proj bias is added)
        any_head = heads.clamp(max=1) if isinstance(heads, Tensor) else min(heads, 1)
        return (
            2 * norm_flops(tokens, d) * any_head
            + attention_flops(tokens, d, heads, d // h)
            + mlp_flops(tokens, d, self.mlp_hidden, heads / h)
        )

    def layer(self, executed: Number, tokens: Number, heads: Number) -> Number:
        """Controller l + block l: executed ∈ {0, 1} (or a straight-through mask)."""
        return self.controller_block + executed * (self.controller_branches + self.block(tokens, heads))

    def outside(self) -> float:
        """Patch embedding, final norm (timm normalises every token) and classifier."""
        tokens = self.num_patches + 1
        return (
            patch_embed_flops(self.num_patches, self.dim, self.patch_size, self.in_chans)
            + norm_flops(tokens, self.dim)
            + self.dim * self.num_classes
        )

    def total(self) -> float:
        """Everything on (FLOPs_total): the backbone plus every controller."""
        return self.outside() + self.depth * self.layer(1.0, self.num_patches + 1, self.num_heads)

    def executed(self, blocks: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
        """Per image FLOPs from (B, L) executed blocks, active-head counts and kept patch-token
        counts (cls excluded); differentiable when the counts come from straight-through masks."""
        per_layer = self.layer(blocks, tokens + 1, heads)  # (B, L)
        return per_layer.sum(dim=1) + self.outside()


def controller_flops(controller: MIAController, num_patches: int) -> tuple[float, float]:
    """(always-run part, head + token branches) of one controller, fvcore convention."""
    d, r, n = controller.dim, controller.reduced, num_patches
    block = 0.0
    if hasattr(controller, "cnn"):
        pooled = controller.pool_size[0] * controller.pool_size[1]
        block += pooled * n * d  # the average pool as a (pooled, N) @ (N, D) matmul
        block += pooled * 9 * d * r + pooled * 9 * r * r  # two 3×3 convolutions: every tap ...
        block += 2 * pooled * 9 * pooled * r  # ... and the sums of each position's taps
    if controller.skip_blocks:
        block += r * 2  # FC_b
    branches = 0.0
    if controller.skip_heads:
        branches += r * r + controller.num_heads * controller.head_reduced * 2  # FC_h1, FC_h2
    if controller.skip_tokens:
        token_in = 2 * r if controller.token_global else r
        branches += norm_flops(n, d) + n * d * r + n * r * r + n * token_in * 2  # LN, MLP_n, FC_n
    return block, branches
