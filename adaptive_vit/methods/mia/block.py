"""The MIA-Block: one timm `Block` run under block, head and token decisions.

Both paths read the timm block's own weights (norm1, attn.qkv/proj, norm2, mlp.fc1/fc2), so the
backbone's state_dict layout is unchanged and a static checkpoint loads as is.

Semantics (docs/methods.md, MIA-Former: MIA-Block):
- block skipped → identity;
- attention: q, k, v only for the active heads, attention only among the kept tokens, the proj
  reads the active heads' outputs and writes all D channels (cost linear in the heads);
- MLP with head-grouped channels: channel c belongs to head c // E, hidden unit j to group
  j // (M/H); fc1 reads only the active groups' channels and computes only their hidden units,
  fc2 writes only the active groups' channels (cost ∝ (h/H)²);
- inactive channels and dropped tokens keep their residual value; the cls token is always kept.

`masked_block` (training) applies this with multiplicative masks, so straight-through gradients
reach the controller; `sliced_block` (inference) saves the compute for real: it gathers the kept
tokens, slices the active heads' weights and runs only the images that execute the block, grouping
images with the same head pattern (one group at batch size 1).

Decision: a block executed with zero active heads still adds its proj bias to the kept tokens
(that is what the masked formula, eq. 4 of the paper, computes) and nothing else.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_block(block: nn.Module, x: Tensor, executed: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
    """Training path: every decision applied as a multiplicative mask.

    Args:
        block: a `backbones.Block`.
        x: (B, T, D) input, T = 1 + N.
        executed: (B,) 1 = run the block, 0 = identity.
        heads: (B, H) 1 = head active.
        tokens: (B, T) 1 = token kept (cls included, always 1).

    Returns:
        (B, T, D) output.
    """
    attn, mlp = block.attn, block.mlp
    B, T, D = x.shape
    H, E = attn.num_heads, attn.head_dim
    qkv = attn.qkv(block.norm1(x)).reshape(B, T, 3, H, E).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, T, E)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, T, T)
    # DynamicViT's masked softmax: key j is visible to query i if kept, or if j == i (a dropped
    # query still attends to itself, so every row has a non-zero sum); differentiable in `tokens`.
    eye = torch.eye(T, device=x.device, dtype=x.dtype)
    visible = tokens[:, None, None, :] + (1 - tokens[:, None, None, :]) * eye  # (B, 1, T, T)
    top = logits.masked_fill(visible == 0, float("-inf")).amax(-1, keepdim=True).detach()
    weights = (logits - top).exp() * visible
    weights = attn.attn_drop(weights / weights.sum(-1, keepdim=True))
    out = (weights @ v) * heads[:, :, None, None]  # inactive heads contribute nothing
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, T, D))))
    gate = (executed[:, None] * tokens)[..., None]  # (B, T, 1): dropped tokens keep their residual
    x = x + block.drop_path1(block.ls1(out)) * gate

    channels = heads.repeat_interleave(E, dim=1)[:, None, :]  # (B, 1, D)
    hidden = heads.repeat_interleave(mlp.fc1.out_features // H, dim=1)[:, None, :]  # (B, 1, M)
    h = mlp.drop1(mlp.act(mlp.fc1(block.norm2(x) * channels)) * hidden)
    out = mlp.drop2(mlp.fc2(mlp.norm(h)) * channels)
    return x + block.drop_path2(block.ls2(out)) * gate


def sliced_block(block: nn.Module, x: Tensor, samples: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
    """Inference path: only the executing images, kept tokens and active heads are computed.

    Args:
        block: a `backbones.Block` in eval mode.
        x: (B, T, D) input.
        samples: (G,) long, the images that execute the block.
        heads: (G, H) bool, their active heads (images sharing a head set run together).
        tokens: (G, N) bool, their kept patch tokens.

    Returns:
        (B, T, D) output (skipping images unchanged).
    """
    if samples.numel() == 0:
        return x
    groups: dict[tuple[int, ...], list[int]] = {}  # active heads → members (rows of `heads`)
    for member, row in enumerate(heads.tolist()):  # one host read (few ops: batch 1 is op-bound)
        groups.setdefault(tuple(h for h, on in enumerate(row) if on), []).append(member)
    if len(groups) == 1 and samples.numel() == x.shape[0]:  # one group, every image (batch size 1)
        return _group_update(block, x, tokens, next(iter(groups)), heads.shape[1])
    out = x.clone()
    for active, members in groups.items():
        members = torch.tensor(members, device=x.device)
        group = samples[members]
        out.index_copy_(0, group, _group_update(block, x[group], tokens[members], active, heads.shape[1]))
    return out


def _group_update(block: nn.Module, x: Tensor, tokens: Tensor, active: tuple[int, ...], num_heads: int) -> Tensor:
    """Block output (g, T, D) of images sharing the active heads `active`."""
    xs, rows, valid = gather_tokens(x, tokens)
    delta = _sliced_delta(block, xs, None if len(active) == num_heads else active, valid)
    return add_at_tokens(x, delta, rows, valid)


def gather_tokens(x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The cls token and the kept patch tokens of each image, first, in order.

    Rows are picked with `index_select` on `x` viewed as (g·T, D): on CPU at batch 1 that is
    faster than `gather` with an expanded (g, t, D) index (measured: docs/performance.md,
    MIA-Former).

    Args:
        x: (g, T, D).
        keep: (g, N) bool.

    Returns:
        (g, t, D) gathered tokens with t = the largest kept count + 1; (g·t,) their rows in `x`
        viewed as (g·T, D) (None if all are kept); (g, t) bool validity of the gathered rows
        (None when every image keeps the same number). An image that keeps fewer than t tokens
        is padded with distinct dropped tokens of its own.
    """
    g, T, D = x.shape
    full = torch.cat([keep.new_ones(g, 1), keep], dim=1)  # (g, T)
    counts = full.sum(1)
    if bool((counts == T).all()):
        return x, None, None
    t = int(counts.max())
    order = torch.argsort((~full).to(torch.uint8), dim=1, stable=True)[:, :t]  # kept first, in order
    rows = (order + torch.arange(0, g * T, T, device=x.device)[:, None]).flatten()
    gathered = x.reshape(g * T, D).index_select(0, rows).view(g, t, D)
    valid = None if bool((counts == t).all()) else torch.arange(t, device=x.device) < counts[:, None]
    return gathered, rows, valid


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


def _take(weight: Tensor, dim: int, active: tuple[int, ...], width: int) -> Tensor:
    """The `width`-wide slices of the active heads along `dim`: a view (no copy) when the heads
    are contiguous, a gathered copy otherwise."""
    if _is_range(active):
        return weight.narrow(dim, active[0] * width, len(active) * width)
    return weight.index_select(dim, _head_channels(active, width, weight.device))


def _add_to_heads(out: Tensor, update: Tensor, active: tuple[int, ...], width: int) -> Tensor:
    """`out` with `update` added, in place, to the active heads' `width`-wide slices of its last axis."""
    update = update.to(out.dtype)
    if _is_range(active):
        out.narrow(-1, active[0] * width, len(active) * width).add_(update)
        return out
    return out.index_add_(-1, _head_channels(active, width, out.device), update)


def _is_range(active: tuple[int, ...]) -> bool:
    return active[-1] - active[0] + 1 == len(active)


@functools.lru_cache(maxsize=1024)
def _head_channels(active: tuple[int, ...], width: int, device: torch.device) -> Tensor:
    """Indices of the `width` channels of each active head (cached: built once per head set).
    Built as a normal tensor even under `torch.inference_mode` (the benchmark's), so a later
    forward that records gradients (an attack) can still use the cached index."""
    with torch.inference_mode(False):
        return torch.tensor([h * width + i for h in active for i in range(width)], device=device)


def _sliced_delta(block: nn.Module, x: Tensor, active: tuple[int, ...] | None, valid: Tensor | None) -> Tensor:
    """Residual update (attention + MLP) of a group sharing one head set.

    Args:
        block: the timm block.
        x: (g, t, D) gathered tokens.
        active: active head indices, None = all heads (full weights, no slicing).
        valid: (g, t) bool, False on padding rows (masked out as keys), or None.
    """
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
        # the active heads' q, k and v rows as one (3kE, D) weight: one matmul (copying the
        # sliced rows and running one linear is faster on CPU than a batched matmul over q, k, v)
        w_qkv = _take(attn.qkv.weight.view(3, H * E, D), 1, active, E).reshape(3 * k * E, D)
        b_qkv = attn.qkv.bias
        if b_qkv is not None:
            b_qkv = _take(b_qkv.view(3, H * E), 1, active, E).reshape(3 * k * E)
        qkv = F.linear(y, w_qkv, b_qkv).reshape(g, t, 3, k, E).permute(2, 0, 3, 1, 4)
        w_proj = _take(attn.proj.weight, 1, active, E)
    q, key, v = qkv.unbind(0)  # (g, k, t, E)
    q, key = attn.q_norm(q), attn.k_norm(key)
    mask = None
    if valid is not None:  # padding rows are not keys
        mask = torch.zeros(g, 1, 1, t, device=x.device, dtype=q.dtype).masked_fill(~valid[:, None, None, :], float("-inf"))
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
    group = mlp.fc1.out_features // H
    w1 = _take(_take(mlp.fc1.weight, 0, active, group), 1, active, E)  # (k·M/H, kE)
    w2 = _take(_take(mlp.fc2.weight, 0, active, E), 1, active, group)  # (kE, k·M/H)
    b1 = None if mlp.fc1.bias is None else _take(mlp.fc1.bias, 0, active, group)
    b2 = None if mlp.fc2.bias is None else _take(mlp.fc2.bias, 0, active, E)
    m = F.linear(mlp.act(F.linear(_take(y, 2, active, E), w1, b1)), w2, b2)  # (g, t, kE)
    return _add_to_heads(a, m, active, E)  # fc2 writes only the active groups' channels
