"""Analytic FLOPs of MIA-Former per image, from its decisions (docs/methods.md, MIA-Former: cost).

Per executed block with n tokens (prefix included) and the active heads h: the block's own
formula (`BlockOps.flops`; for a DeiT block norm1 + norm2 on n tokens, qkv n·D·3hE, attention
2n²hE, proj n·hE·D, MLP 2·n·hE·(h/H)M), plus every executed controller part; everything that
always runs (stem, the blocks between stages, final norm, head) is the backbone's cost less its
blocks'. The same arithmetic works on floats and on tensors, so with straight-through masks the
cost is differentiable.

Controller parts, counted as fvcore counts them (a test checks): the 4×4 average pool is a
(16, N) @ (N, D) matmul (see controller.py), the two 3×3 convolutions count every kernel tap at
every pooled position plus the (16, 144) @ (144, D/4) matmul that sums each position's taps
(`RowConv3x3`), means and activations count 0.
The block part (pool, CNN_b, FC_b) runs before every block for every image; the head and token
branches only for images that execute the block (the paper: skipping a block spares computing its
head and token policies). Critic heads run only in training and are not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from adaptive_vit.flops import norm_flops
from adaptive_vit.methods.mia.controller import MIAController

Number = float | Tensor


@dataclass(frozen=True)
class StageCost:
    """FLOPs of the layers (controller + block) of one stage: blocks of one shape.

    Args:
        depth: blocks in the stage.
        num_heads: H of its blocks.
        num_patches: N, its decided tokens.
        num_prefix_tokens: P, its always-kept tokens.
        block: FLOPs of one block on n tokens (prefix included) with a (..., H) active-head mask
            (None: every head; `BlockOps.flops`).
        controller_block: FLOPs of a controller's always-run part (pool, CNN_b, FC_b).
        controller_branches: FLOPs of its head and token branches (run when the block runs).
    """

    depth: int
    num_heads: int
    num_patches: int
    num_prefix_tokens: int
    block: Callable[[Number, Tensor | None], Number]
    controller_block: float
    controller_branches: float

    def layer(self, executed: Number, tokens: Number, heads: Tensor | None) -> Number:
        """Controller + block: executed ∈ {0, 1} (or a straight-through mask), `tokens` kept patch
        tokens, `heads` (..., H) the active heads (None: all)."""
        block = self.block(tokens + self.num_prefix_tokens, heads)
        return self.controller_block + executed * (self.controller_branches + block)

    def total(self) -> float:
        """Every layer with everything on."""
        return self.depth * self.layer(1.0, self.num_patches, None)


@dataclass(frozen=True)
class MIACost:
    """FLOPs of one MIA-Former configuration: its stages' layers and what always runs.

    Args:
        stages: the layers' costs, stage by stage.
        outside: FLOPs of everything that runs for every image outside the layers.
    """

    stages: tuple[StageCost, ...]
    outside: float

    @classmethod
    def of(cls, stages: list[tuple[StageCost, ...]], backbone_gflops: float) -> MIACost:
        """From the stages' costs and the plain backbone's GFLOPs (its blocks included)."""
        stages = tuple(stages)
        blocks = sum(s.depth * s.block(s.num_patches + s.num_prefix_tokens, None) for s in stages)
        return cls(stages, backbone_gflops * 1e9 - blocks)

    def total(self) -> float:
        """Everything on (FLOPs_total): the backbone plus every controller."""
        return self.outside + sum(s.total() for s in self.stages)

    def executed(self, blocks: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
        """Per image FLOPs from (B, L) executed blocks, (B, L, H_max) active-head masks (each
        layer's first H of its stage) and (B, L) kept patch-token counts (prefix excluded);
        differentiable when they come from straight-through masks."""
        total, start = self.outside, 0
        for s in self.stages:
            layers = slice(start, start + s.depth)
            total = total + s.layer(blocks[:, layers], tokens[:, layers], heads[:, layers, :s.num_heads]).sum(1)
            start += s.depth
        return total

    def without_controllers(self) -> MIACost:
        """The same blocks with no controller counted (what the blocks alone execute)."""
        stages = tuple(dataclasses.replace(s, controller_block=0.0, controller_branches=0.0) for s in self.stages)
        return dataclasses.replace(self, stages=stages)


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
        branches += r * controller.num_heads * controller.head_reduced  # FC_h1
        branches += controller.num_heads * controller.head_reduced * 2  # FC_h2
    if controller.skip_tokens:
        token_in = 2 * r if controller.token_global else r
        branches += norm_flops(n, d) + n * d * r + n * r * r + n * token_in * 2  # LN, MLP_n, FC_n
    return block, branches
