"""The MIA-Block on LeViT: timm's `LevitBlock` (attention residual, then MLP residual) under block,
head and token decisions (docs/levit.md).

The semantics are DeiT-S's (block.py), carried over to LeViT's layers:

- heads: the qkv `LinearNorm` computes q, k (``key_dim`` each) and v (``val_dim``) only for the
  active heads (their rows of the weight, their BatchNorm channels); the proj reads the active
  heads' values and writes all D channels; cost linear in the heads;
- MLP with head-grouped channels, as for DeiT-S: the D channels and the M hidden units are split
  into H contiguous groups (`block.split_bounds`; LeViT-192's second stage, 288 channels over
  5 heads, has groups of 57 and 58 channels, and its 576 hidden units groups of 115 and 116:
  the paper assumes D = H·E); ln1 reads the active groups' channels and computes their hidden
  units, ln2 writes only the active groups' channels;
- tokens: no class token, every token is decided. Attention runs among the kept tokens only, and
  a kept token keeps its own position biases: the bias of queries i and keys j is
  ``attention_biases[h, attention_bias_idxs[i, j]]`` for the tokens' positions in the full grid,
  gathered for the kept ones;
- BatchNorm: every `LinearNorm`'s BatchNorm runs on its running statistics, in training too
  (`MIAFormer.train` keeps the backbone's BatchNorms in eval mode), i.e. as a per-channel affine
  map. Sliced, a BatchNorm is applied to the computed channels only, with their statistics, as
  timm applies it (after the linear, not folded into it), so both paths and the static model
  compute the same numbers and fvcore counts the same operations.

A block executed with zero active heads adds its proj BatchNorm's shift (the proj's output for a
zero input) to the kept tokens and nothing else, as a DeiT block adds its proj bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.levit import LevitBlock, LinearNorm
from torch import Tensor, nn

from adaptive_vit.backbones.levit import attention_flops, mlp_flops
from adaptive_vit.methods.mia.block import (
    BlockOps,
    Bounds,
    Number,
    active_count,
    add_to_heads,
    at_most_one,
    group_sizes,
    head_channels,
    head_mask,
    masked_softmax,
    padding_mask,
    register_block_ops,
    split_bounds,
    uniform_bounds,
)


def mlp_groups(block: LevitBlock) -> tuple[Bounds, Bounds]:
    """Head groups of the MLP's D channels and of its M hidden units."""
    H, ln1 = block.attn.num_heads, block.mlp.ln1.linear
    return split_bounds(ln1.in_features, H), split_bounds(ln1.out_features, H)


def linear_norm(layer: LinearNorm, x: Tensor, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
    """`layer` (Linear, then BatchNorm on its running statistics) computing only the output
    channels `rows` from the input channels `cols` (None: all).

    Args:
        layer: a timm `LinearNorm`.
        x: (..., len(cols)) input.
        rows: (k,) output channel indices, or a slice.
        cols: (c,) input channel indices, or a slice.
    """
    weight, bn = layer.linear.weight, layer.bn
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    y = F.linear(x, weight)
    pick = slice(None) if rows is None else rows
    out = F.batch_norm(y.flatten(0, -2), bn.running_mean[pick], bn.running_var[pick], bn.weight[pick],
                       bn.bias[pick], training=False, eps=bn.eps)
    return out.view_as(y)


def shift(layer: LinearNorm) -> Tensor:
    """(C,) the output of `layer` for a zero input: its BatchNorm's shift."""
    bn = layer.bn
    return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)


class LeViTBlockOps(BlockOps):
    """timm's `LevitBlock` in the Linear + BatchNorm form (see the module docstring)."""

    def check(self, block: nn.Module) -> None:
        if block.attn.use_conv:
            raise ValueError("MIA-Former runs LeViT in its Linear + BatchNorm form (levit_*, not levit_conv_*).")

    def masked(self, block: nn.Module, x: Tensor, executed: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
        attn, mlp = block.attn, block.mlp
        B, T, D = x.shape
        H = attn.num_heads
        q, k, v = attn.qkv(x).view(B, T, H, -1).split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, ·)
        logits = (q @ k.transpose(-2, -1)) * attn.scale + attn.get_attention_biases(x.device)  # (B, H, T, T)
        out = (masked_softmax(logits, tokens) @ v) * heads[:, :, None, None]  # inactive heads: nothing
        out = attn.proj(out.transpose(1, 2).reshape(B, T, attn.val_attn_dim))  # Hardswish(0) = 0
        gate = (executed[:, None] * tokens)[..., None]  # (B, T, 1): dropped tokens keep their residual
        x = x + block.drop_path1(out) * gate

        channels, hidden = mlp_groups(block)
        h = mlp.drop(mlp.act(mlp.ln1(x * head_mask(heads, channels))) * head_mask(heads, hidden))
        out = mlp.ln2(h) * head_mask(heads, channels)
        return x + block.drop_path2(out) * gate

    def delta(self, block: nn.Module, x: Tensor, active: tuple[int, ...] | None, valid: Tensor | None,
              positions: Tensor | None) -> Tensor:
        attn, mlp = block.attn, block.mlp
        g, t, D = x.shape
        H, kd, vd = attn.num_heads, attn.key_dim, attn.val_dim
        heads = tuple(range(H)) if active is None else active
        if not heads:  # the proj's output for a zero input
            return shift(attn.proj.ln).to(x.dtype).expand(g, t, D)
        k = len(heads)
        sliced = active is not None
        qkv_rows = head_channels(heads, uniform_bounds(H, 2 * kd + vd), x.device) if sliced else None
        q, key, v = linear_norm(attn.qkv, x, qkv_rows).view(g, t, k, -1).split([kd, kd, vd], dim=3)
        q, key, v = q.transpose(1, 2), key.transpose(1, 2), v.transpose(1, 2)  # (g, k, t, ·)
        bias = attn.get_attention_biases(x.device)  # (H, N, N)
        if sliced:
            bias = bias[list(heads)]
        if positions is not None:  # each kept token with its own biases: (k, g, t, t) → (g, k, t, t)
            bias = bias[:, positions[:, :, None], positions[:, None, :]].transpose(0, 1)
        logits = (q @ key.transpose(-2, -1)) * attn.scale + bias
        mask = padding_mask(valid, logits)  # padding rows are not keys
        if mask is not None:
            logits = logits + mask
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(g, t, k * vd)
        values = head_channels(heads, uniform_bounds(H, vd), x.device) if sliced else None
        # writes all D, in the residual stream's dtype (under autocast the linears give half precision)
        a = linear_norm(attn.proj.ln, attn.proj.act(o), cols=values).to(x.dtype)
        y = x + a
        if not sliced:
            return a + mlp(y)
        channels, hidden = mlp_groups(block)
        c, m = head_channels(heads, channels, x.device), head_channels(heads, hidden, x.device)
        h = mlp.act(linear_norm(mlp.ln1, y[..., c], rows=m, cols=c))
        return add_to_heads(a, linear_norm(mlp.ln2, h, rows=c, cols=m), heads, channels)

    def flops(self, block: nn.Module, tokens: Number, heads: Tensor | None = None) -> Number:
        """attention (`backbones.levit.attention_flops` with h heads) + MLP on the active groups'
        channels and hidden units; zero heads: 0."""
        channels, hidden = mlp_groups(block)
        h = active_count(heads, block.attn.num_heads)
        if heads is not None:
            channels, hidden = heads @ group_sizes(channels, heads), heads @ group_sizes(hidden, heads)
        else:
            channels, hidden = channels[-1], hidden[-1]
        return (attention_flops(block.attn, tokens, h) + mlp_flops(tokens, channels, hidden)) * at_most_one(h)

register_block_ops(LevitBlock, LeViTBlockOps())
