"""The MIA-Block: one backbone block run under block, head and token decisions.

Both paths read the block's own weights (for a timm `Block`: norm1, attn.qkv/proj, norm2,
mlp.fc1/fc2), so the backbone's state_dict layout is unchanged and a static checkpoint loads as is.
What is generic (grouping images by head set, gathering kept tokens, slicing head-grouped
channels) is here; what depends on the block's layers is a `BlockOps` per block class
(`ViTBlockOps` here, `levit_block.LeViTBlockOps` for LeViT), found by `block_ops(block)`.

Semantics (docs/methods.md, MIA-Former: MIA-Block):
- block skipped → identity;
- attention: q, k, v only for the active heads, attention only among the kept tokens, the proj
  reads the active heads' outputs and writes all D channels (cost linear in the heads);
- MLP with head-grouped channels: channel c belongs to head c // E, hidden unit j to group
  j // (M/H); fc1 reads only the active groups' channels and computes only their hidden units,
  fc2 writes only the active groups' channels (cost ∝ (h/H)²);
- inactive channels and dropped tokens keep their residual value; prefix (cls) tokens are always kept.

`masked_block` (training) applies this with multiplicative masks, so straight-through gradients
reach the controller; `sliced_block` (inference) saves the compute for real: it gathers the kept
tokens, slices the active heads' weights and runs only the images that execute the block, grouping
images with the same head pattern (one group at batch size 1).

Decision: a block executed with zero active heads still adds its proj bias to the kept tokens
(that is what the masked formula, eq. 4 of the paper, computes) and nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from adaptive_vit.flops import attention_flops, mlp_flops, norm_flops

Number = float | Tensor


Bounds = tuple[int, ...]  # channel boundaries of the head groups: group h is [b[h], b[h + 1])


def uniform_bounds(num_heads: int, width: int) -> Bounds:
    """H groups of `width` channels (a ViT's heads of width E)."""
    return tuple(range(0, (num_heads + 1) * width, width))


def split_bounds(channels: int, num_heads: int) -> Bounds:
    """`channels` split into H contiguous groups, group h = [⌊h·C/H⌋, ⌊(h+1)·C/H⌋): equal groups
    when H divides C (then `uniform_bounds`), groups one channel apart otherwise (LeViT-192's
    288 channels over 5 heads)."""
    return tuple(h * channels // num_heads for h in range(num_heads + 1))


def group_sizes(bounds: Bounds, like: Tensor) -> Tensor:
    """(H,) channels per head group, in `like`'s dtype and device (for cost formulas)."""
    return like.new_tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])])


def head_mask(heads: Tensor, bounds: Bounds) -> Tensor:
    """(B, H) head decisions → (B, 1, C) channel mask, channel c taking its group's decision."""
    return heads[:, _group_of(bounds, heads.device)][:, None, :]


@functools.lru_cache(maxsize=256)
def _group_of(bounds: Bounds, device: torch.device) -> Tensor:
    with torch.inference_mode(False):
        return torch.tensor([h for h in range(len(bounds) - 1) for _ in range(bounds[h], bounds[h + 1])], device=device)


def active_count(heads: Tensor | None, num_heads: int) -> Number:
    """Active heads of a (..., H) mask; `num_heads` for None (all)."""
    return num_heads if heads is None else heads.sum(-1)


def at_most_one(count: Number) -> Number:
    """min(count, 1): 0 when no head is active, else 1."""
    return count.clamp(max=1) if isinstance(count, Tensor) else min(count, 1)


def masked_softmax(logits: Tensor, tokens: Tensor) -> Tensor:
    """DynamicViT's masked softmax over (B, H, T, T) logits: key j is visible to query i if kept,
    or if j == i (a dropped query still attends to itself, so every row has a non-zero sum);
    differentiable in `tokens` (B, T)."""
    T = logits.shape[-1]
    eye = torch.eye(T, device=logits.device, dtype=logits.dtype)
    visible = tokens[:, None, None, :] + (1 - tokens[:, None, None, :]) * eye  # (B, 1, T, T)
    top = logits.masked_fill(visible == 0, float("-inf")).amax(-1, keepdim=True).detach()
    weights = (logits - top).exp() * visible
    return weights / weights.sum(-1, keepdim=True)


class BlockOps:
    """How MIA-Former runs one kind of block. Subclasses fill in every method."""

    def check(self, block: nn.Module) -> None:
        """Refuse a block variant the methods below would get wrong (a clear ValueError)."""

    def masked(self, block: nn.Module, x: Tensor, executed: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
        """Training path: every decision applied as a multiplicative mask.

        Args:
            block: the block.
            x: (B, T, D) input, T = P + N (P prefix tokens).
            executed: (B,) 1 = run the block, 0 = identity.
            heads: (B, H) 1 = head active.
            tokens: (B, T) 1 = token kept (prefix tokens always 1).

        Returns:
            (B, T, D) output.
        """
        raise NotImplementedError

    def delta(self, block: nn.Module, x: Tensor, active: tuple[int, ...] | None, valid: Tensor | None,
              positions: Tensor | None) -> Tensor:
        """Inference path: the residual update (g, t, D) of images sharing one head set.

        Args:
            block: the block in eval mode.
            x: (g, t, D) gathered tokens.
            active: active head indices, None = all heads (full weights, no slicing).
            valid: (g, t) bool, False on padding rows (masked out as keys), or None.
            positions: (g, t) long, each gathered token's index in the block's input (None: all
                tokens, in order).
        """
        raise NotImplementedError

    def flops(self, block: nn.Module, tokens: Number, heads: Tensor | None = None) -> Number:
        """FLOPs of the block on `tokens` tokens (prefix included) with the active heads `heads`,
        a (..., H) 0/1 mask (float; straight-through masks keep it differentiable; None: every
        head, a float), as fvcore counts the sliced path. Zero active heads execute nothing that
        counts (see the module docstring)."""
        raise NotImplementedError


_BLOCK_OPS: list[tuple[type, BlockOps]] = []


def register_block_ops(block_class: type, ops: BlockOps) -> None:
    """Have MIA-Former run blocks of `block_class` (and its subclasses) with `ops`."""
    _BLOCK_OPS.insert(0, (block_class, ops))


def block_ops(block: nn.Module) -> BlockOps:
    """The `BlockOps` of `block`'s class, its variant checked."""
    for block_class, ops in _BLOCK_OPS:
        if isinstance(block, block_class):
            ops.check(block)
            return ops
    known = ", ".join(c.__name__ for c, _ in _BLOCK_OPS)
    raise ValueError(f"MIA-Former cannot slice blocks of type {type(block).__name__} (it runs {known}).")


def masked_block(block: nn.Module, x: Tensor, executed: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
    """`BlockOps.masked` of `block`'s kind."""
    return block_ops(block).masked(block, x, executed, heads, tokens)


def sliced_block(block: nn.Module, x: Tensor, samples: Tensor, heads: Tensor, tokens: Tensor,
                 ops: BlockOps | None = None) -> Tensor:
    """Inference path: only the executing images, kept tokens and active heads are computed.

    Args:
        block: the block in eval mode.
        x: (B, T, D) input, T = P + N.
        samples: (G,) long, the images that execute the block.
        heads: (G, H) bool, their active heads (images sharing a head set run together).
        tokens: (G, N) bool, their kept patch tokens.
        ops: the block's `BlockOps` (looked up when None).

    Returns:
        (B, T, D) output (skipping images unchanged).
    """
    if samples.numel() == 0:
        return x
    ops = ops or block_ops(block)
    groups: dict[tuple[int, ...], list[int]] = {}  # active heads → members (rows of `heads`)
    for member, row in enumerate(heads.tolist()):  # one host read (few ops: batch 1 is op-bound)
        groups.setdefault(tuple(h for h, on in enumerate(row) if on), []).append(member)
    if len(groups) == 1 and samples.numel() == x.shape[0]:  # one group, every image (batch size 1)
        return _group_update(block, ops, x, tokens, next(iter(groups)), heads.shape[1])
    out = x.clone()
    for active, members in groups.items():
        members = torch.tensor(members, device=x.device)
        group = samples[members]
        out.index_copy_(0, group, _group_update(block, ops, x[group], tokens[members], active, heads.shape[1]))
    return out


def _group_update(block: nn.Module, ops: BlockOps, x: Tensor, tokens: Tensor, active: tuple[int, ...],
                  num_heads: int) -> Tensor:
    """Block output (g, T, D) of images sharing the active heads `active`."""
    xs, rows, valid, positions = gather_tokens(x, tokens)
    if xs.shape[1] == 0:  # no prefix token and no token kept (LeViT): nothing runs
        return x
    delta = ops.delta(block, xs, None if len(active) == num_heads else active, valid, positions)
    return add_at_tokens(x, delta, rows, valid)


def gather_tokens(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The prefix tokens and the kept patch tokens of each image, first, in order.

    Rows are picked with `index_select` on `x` viewed as (g·T, D): on CPU at batch 1 that is
    faster than `gather` with an expanded (g, t, D) index (measured: docs/performance.md,
    MIA-Former).

    Args:
        x: (g, T, D), T = P + N.
        keep: (g, N) bool.

    Returns:
        (g, t, D) gathered tokens with t = P + the largest kept count; (g·t,) their rows in `x`
        viewed as (g·T, D), and (g, t) their positions in T (both None if all are kept); (g, t)
        bool validity of the gathered rows (None when every image keeps the same number). An
        image that keeps fewer is padded with distinct dropped tokens of its own.
    """
    g, T, D = x.shape
    full = torch.cat([keep.new_ones(g, T - keep.shape[1]), keep], dim=1)  # (g, T)
    counts = full.sum(1)
    if bool((counts == T).all()):
        return x, None, None, None
    t = int(counts.max())
    order = torch.argsort((~full).to(torch.uint8), dim=1, stable=True)[:, :t]  # kept first, in order
    rows = (order + torch.arange(0, g * T, T, device=x.device)[:, None]).flatten()
    gathered = x.reshape(g * T, D).index_select(0, rows).view(g, t, D)
    valid = None if bool((counts == t).all()) else torch.arange(t, device=x.device) < counts[:, None]
    return gathered, rows, valid, order


def add_at_tokens(x: Tensor, delta: Tensor, rows: Tensor | None, valid: Tensor | None) -> Tensor:
    """Inverse of `gather_tokens` for a residual update: `x` (g, T, D) with `delta` (g, t, D)
    added at the gathered tokens' rows (the other tokens keep their value).

    One `index_add` on (g·T, D) rows (on CPU at batch 1 faster than `scatter_add` with an
    expanded index; docs/performance.md). Padding rows are zeroed (they are distinct dropped
    tokens, so nothing else lands on them)."""
    if rows is None:
        return x + delta
    if valid is not None:
        delta = delta * valid[..., None]
    g, T, D = x.shape
    return x.reshape(g * T, D).index_add(0, rows, delta.reshape(g * delta.shape[1], D)).view(g, T, D)


def padding_mask(valid: Tensor | None, like: Tensor) -> Tensor | None:
    """Additive key mask, -inf on padding rows (None: no padding): (g, 1, 1, t); or (g, 1, t, t)
    when an image keeps no token at all (no prefix token), where each padding query also sees
    itself, so that no softmax row is empty (its output is discarded)."""
    if valid is None:
        return None
    g, t = valid.shape
    hidden = ~valid[:, None, None, :]  # (g, 1, 1, t)
    if not bool(valid[:, 0].all()):
        hidden = hidden & ~torch.eye(t, dtype=torch.bool, device=valid.device)
    return torch.zeros(hidden.shape, device=like.device, dtype=like.dtype).masked_fill(hidden, float("-inf"))


def head_channels(active: Sequence[int], bounds: Bounds, device: torch.device) -> slice | Tensor:
    """The active heads' channels: a slice when the heads are contiguous, an index otherwise."""
    if _is_range(active):
        return slice(bounds[active[0]], bounds[active[-1] + 1])
    return _head_channels(tuple(active), bounds, device)


def take(weight: Tensor, dim: int, active: Sequence[int], bounds: Bounds) -> Tensor:
    """The active heads' channel groups of `weight` along `dim`: a view (no copy) when the heads
    are contiguous, a gathered copy otherwise."""
    index = head_channels(active, bounds, weight.device)
    if isinstance(index, slice):
        return weight.narrow(dim, index.start, index.stop - index.start)
    return weight.index_select(dim, index)


def add_to_heads(out: Tensor, update: Tensor, active: Sequence[int], bounds: Bounds) -> Tensor:
    """`out` with `update` added, in place, to the active heads' channel groups of its last axis."""
    update = update.to(out.dtype)
    index = head_channels(active, bounds, out.device)
    if isinstance(index, slice):
        out[..., index].add_(update)
        return out
    return out.index_add_(-1, index, update)


def _is_range(active: Sequence[int]) -> bool:
    return active[-1] - active[0] + 1 == len(active)


@functools.lru_cache(maxsize=1024)
def _head_channels(active: tuple[int, ...], bounds: Bounds, device: torch.device) -> Tensor:
    """Indices of the channels of each active head (cached: built once per head set).
    Built as a normal tensor even under `torch.inference_mode` (the benchmark's), so a later
    forward that records gradients (an attack) can still use the cached index."""
    with torch.inference_mode(False):
        return torch.tensor([c for h in active for c in range(bounds[h], bounds[h + 1])], device=device)


class ViTBlockOps(BlockOps):
    """timm's pre-norm `Block` (DeiT, ViT; this project's `backbones.Block`)."""

    def check(self, block: nn.Module) -> None:
        plain = all(isinstance(m, nn.Identity) for m in (block.ls1, block.ls2, block.attn.norm, block.mlp.norm))
        gated = getattr(block.attn, "gate", None) is not None
        if not plain or gated:
            raise ValueError(
                "MIA-Former slices plain timm blocks; this backbone has layer scale, a scale norm or "
                "gated attention. Use a DeiT/ViT backbone without them (e.g. deit_small_patch16_224)."
            )

    def masked(self, block: nn.Module, x: Tensor, executed: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
        attn, mlp = block.attn, block.mlp
        B, T, D = x.shape
        H, E = attn.num_heads, attn.head_dim
        qkv = attn.qkv(block.norm1(x)).reshape(B, T, 3, H, E).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, E)
        q, k = attn.q_norm(q), attn.k_norm(k)
        weights = attn.attn_drop(masked_softmax((q * attn.scale) @ k.transpose(-2, -1), tokens))
        out = (weights @ v) * heads[:, :, None, None]  # inactive heads contribute nothing
        out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, T, D))))
        gate = (executed[:, None] * tokens)[..., None]  # (B, T, 1): dropped tokens keep their residual
        x = x + block.drop_path1(block.ls1(out)) * gate

        channels = head_mask(heads, uniform_bounds(H, E))  # (B, 1, D)
        hidden = head_mask(heads, uniform_bounds(H, mlp.fc1.out_features // H))  # (B, 1, M)
        h = mlp.drop1(mlp.act(mlp.fc1(block.norm2(x) * channels)) * hidden)
        out = mlp.drop2(mlp.fc2(mlp.norm(h)) * channels)
        return x + block.drop_path2(block.ls2(out)) * gate

    def delta(self, block: nn.Module, x: Tensor, active: tuple[int, ...] | None, valid: Tensor | None,
              positions: Tensor | None) -> Tensor:
        attn, mlp = block.attn, block.mlp
        g, t, D = x.shape
        H, E = attn.num_heads, attn.head_dim
        if active is not None and not active:
            bias = attn.proj.bias
            return x.new_zeros(g, t, D) if bias is None else bias.expand(g, t, D)
        y = block.norm1(x)
        if active is None:
            k, w_proj = H, attn.proj.weight
            qkv = attn.qkv(y).reshape(g, t, 3, k, E).permute(2, 0, 3, 1, 4)
        else:
            k = len(active)
            heads = uniform_bounds(H, E)
            # the active heads' q, k and v rows as one (3kE, D) weight: one matmul (copying the
            # sliced rows and running one linear is faster on CPU than a batched matmul over q, k, v)
            w_qkv = take(attn.qkv.weight.view(3, H * E, D), 1, active, heads).reshape(3 * k * E, D)
            b_qkv = attn.qkv.bias
            if b_qkv is not None:
                b_qkv = take(b_qkv.view(3, H * E), 1, active, heads).reshape(3 * k * E)
            qkv = F.linear(y, w_qkv, b_qkv).reshape(g, t, 3, k, E).permute(2, 0, 3, 1, 4)
            w_proj = take(attn.proj.weight, 1, active, heads)
        q, key, v = qkv.unbind(0)  # (g, k, t, E)
        q, key = attn.q_norm(q), attn.k_norm(key)
        mask = padding_mask(valid, q)  # padding rows are not keys
        if attn.fused_attn:
            o = F.scaled_dot_product_attention(q, key, v, attn_mask=mask)
        else:
            logits = (q * attn.scale) @ key.transpose(-2, -1)
            if mask is not None:
                logits = logits + mask
            o = logits.softmax(-1) @ v
        a = F.linear(o.transpose(1, 2).reshape(g, t, k * E), w_proj, attn.proj.bias)  # writes all D
        # the update in the residual stream's dtype, as timm adds each branch to it: under autocast
        # the linears give half precision while the stream stays float32 (`add_at_tokens` needs one dtype)
        a = a.to(x.dtype)
        y = block.norm2(x + a)
        if active is None:
            return a + mlp(y)
        channels, hidden = uniform_bounds(H, E), uniform_bounds(H, mlp.fc1.out_features // H)
        w1 = take(take(mlp.fc1.weight, 0, active, hidden), 1, active, channels)  # (k·M/H, kE)
        w2 = take(take(mlp.fc2.weight, 0, active, channels), 1, active, hidden)  # (kE, k·M/H)
        b1 = None if mlp.fc1.bias is None else take(mlp.fc1.bias, 0, active, hidden)
        b2 = None if mlp.fc2.bias is None else take(mlp.fc2.bias, 0, active, channels)
        m = F.linear(mlp.act(F.linear(take(y, 2, active, channels), w1, b1)), w2, b2)  # (g, t, kE)
        return add_to_heads(a, m, active, channels)  # fc2 writes only the active groups' channels

    def flops(self, block: nn.Module, tokens: Number, heads: Tensor | None = None) -> Number:
        """norm1 + norm2, qkv n·D·3hE, attention 2n²hE, proj n·hE·D (`flops.attention_flops`),
        MLP 2·n·hE·(h/H)M (`flops.mlp_flops` with fraction h/H)."""
        attn = block.attn
        H, D = attn.num_heads, attn.head_dim * attn.num_heads
        h = active_count(heads, H)
        # with no active head nothing is normalised (only the proj bias is added)
        return (2 * norm_flops(tokens, D) * at_most_one(h) + attention_flops(tokens, D, h, attn.head_dim)
                + mlp_flops(tokens, D, block.mlp.fc1.out_features, h / H))


register_block_ops(Block, ViTBlockOps())
