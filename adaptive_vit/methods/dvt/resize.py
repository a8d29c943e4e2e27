"""DVT's resize of a token grid, the paper's way (Figure 5): nearest upsampling, then adaptive
average pooling to the target grid (naive upsampling hurts, paper Table 8).

The nearest upsampling goes to twice the upstream grid by default (Figure 5). The authors' code
instead fixes its size by the target: 14×14 into a 10×10 exit, 20×20 into a 14×14 one, whatever the
upstream grid. Into a 14×14 exit from 10×10 (their three-exit cascades) that is the same ×2; from
7×7 (the two-exit cascade) it is not, so every function here takes the upsampled side `upsampled`
(None: twice the input grid), and DVT follows the authors' sizes where they differ.

Both steps act on each axis of a map independently, so the 2-D resize of a map X is Mᵀ·X·M with
M the (g, s) matrix of the 1-D resize (`resize_matrix`). The tokens (`resize_tokens`) and, when
training, the relations (`resize_keys`, then `resize_queries`) are resized that way: the same
numbers as interpolate + pool, on CPU faster than `F.interpolate` + `F.adaptive_avg_pool2d` on
attention-sized tensors (docs/performance.md, DVT), and they have a backward.

At inference the relations go through one op, `adaptive_vit::resize_relation`
(`resize_relation`): on CPU the compiled kernel (`kernel.py`, faster again), which reads the 1-D resize as two taps per output (`resize_taps`); off the CPU, or without the kernel, the matmuls.

FLOPs count what runs at inference (so analytic costs equal fvcore's): g·g·s + g·s·s
multiply-adds per resized g×g token map (`resize_flops`), and what the kernel computes for the
relations (`resize_relation_flops`): two multiply-adds per output along each axis, four per output
row element along the 2-D query grid. An fvcore handle reports the same count. The matmul fallback
gives the same numbers with more multiply-adds by zero.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptive_vit.flops import register_op_handle
from adaptive_vit.methods.dvt import kernel


def resize_matrix(grid: int, size: int, like: Tensor | None = None, upsampled: int | None = None) -> Tensor:
    """The 1-D Figure-5 resize (nearest upsampling, adaptive average pooling) as a (grid, size)
    matrix M: a signal x of length `grid` resizes to x @ M. Built by resizing the unit signals.

    Args:
        grid: input length.
        size: output length.
        like: a tensor whose device and dtype M takes (default: CPU float32).
        upsampled: length after the nearest upsampling (None: 2·grid).
    """
    unit = torch.eye(grid, dtype=torch.float32, device=None if like is None else like.device)[:, None]  # (g, 1, g)
    stretched = F.interpolate(unit, size=upsampled or 2 * grid, mode="nearest")
    matrix = F.adaptive_avg_pool1d(stretched, size)[:, 0]
    return matrix if like is None else matrix.to(like.dtype)


@functools.cache
def resize_taps(grid: int, size: int, upsampled: int | None = None) -> tuple[Tensor, Tensor]:
    """The 1-D Figure-5 resize `grid` → `size` (through `upsampled`, None: 2·grid) as two taps per
    output (what the kernel reads).

    Returns:
        (size, 2) int64 input indices and (size, 2) float32 weights, so that
        out[i] = weights[i, 0]·x[taps[i, 0]] + weights[i, 1]·x[taps[i, 1]] (a single-tap output has
        a second weight of 0).
    """
    matrix = resize_matrix(grid, size, upsampled=upsampled)  # (grid, size)
    taps = torch.zeros(size, 2, dtype=torch.long)
    weights = torch.zeros(size, 2, dtype=torch.float32)
    for i in range(size):
        inputs = matrix[:, i].nonzero()[:, 0].tolist()
        if len(inputs) > 2:
            raise ValueError(f"the {grid} → {size} resize reads {len(inputs)} inputs for one output: "
                             "the kernel takes at most two (DVT's grids grow, so this cannot happen there).")
        for tap, index in enumerate(inputs):
            taps[i, tap], weights[i, tap] = index, matrix[index, i]
        if len(inputs) == 1:
            taps[i, 1] = inputs[0]
    return taps, weights


def resize_grid(x: Tensor, size: int, upsampled: int | None = None) -> Tensor:
    """Resize square maps to `size`×`size`: nearest upsampling, then adaptive average pooling.

    Args:
        x: (..., g, g).
        size: target side.
        upsampled: side after the nearest upsampling (None: 2·g).
    Returns:
        (..., size, size).
    """
    m = resize_matrix(x.shape[-1], size, like=x, upsampled=upsampled)  # (g, s)
    return torch.matmul(m.T, x @ m)


def resize_flops(maps: int, grid: int, size: int) -> float:
    """Multiply-adds of `resize_grid` on `maps` maps of `grid`×`grid` to `size`×`size`."""
    return maps * (grid * grid * size + grid * size * size)


def resize_tokens(tokens: Tensor, grid: int, size: int, upsampled: int | None = None) -> Tensor:
    """Resize patch tokens laid out row-major on a `grid`×`grid` map to `size`×`size`.

    Args:
        tokens: (..., grid², C).
        grid: side of the input grid.
        size: side of the output grid.
        upsampled: side after the nearest upsampling (None: 2·grid).
    Returns:
        (..., size², C).
    """
    *lead, n, c = tokens.shape
    if n != grid * grid:
        raise ValueError(f"{n} tokens do not form a {grid}x{grid} grid")
    maps = tokens.transpose(-1, -2).reshape(*lead, c, grid, grid)
    return resize_grid(maps, size, upsampled).reshape(*lead, c, size * size).transpose(-1, -2)


def resize_keys(logits: Tensor, grid: int, size: int, upsampled: int | None = None) -> Tensor:
    """Resize the patch keys (last axis) of attention logits; the cls key column is kept as is
    (`upsampled`: as `resize_grid`).

    Args:
        logits: (..., Q, 1 + grid²).
    Returns:
        (..., Q, 1 + size²).
    """
    *lead, queries, _ = logits.shape
    out = logits.new_empty(*lead, queries, 1 + size * size)
    out[..., 0] = logits[..., 0]
    # every query row is one (g, g) map: a batch of them with stride 1 + g² (a view when the
    # leading axes are contiguous, as the relations are: no copy of the input)
    patches = logits[..., 1:].unflatten(-1, (grid, grid)).flatten(0, -3)  # (…·Q, g, g)
    out[..., 1:] = resize_grid(patches, size, upsampled).view(*lead, queries, size * size)
    return out


def resize_queries(logits: Tensor, grid: int, size: int, upsampled: int | None = None) -> Tensor:
    """Resize the patch queries (second-to-last axis); the cls query row is kept as is
    (`upsampled`: as `resize_grid`).

    Args:
        logits: (..., 1 + grid², K).
    Returns:
        (..., 1 + size², K).
    """
    *lead, _, keys = logits.shape
    m = resize_matrix(grid, size, like=logits, upsampled=upsampled)  # (g, s)
    out = logits.new_empty(*lead, 1 + size * size, keys)
    out[..., 0, :] = logits[..., 0, :]
    # the patch rows as (g grid rows, g·K): a view (no copy) when the leading axes are contiguous
    patches = logits[..., 1:, :].unflatten(-2, (grid, grid)).flatten(-2).flatten(0, -3)  # (…, g, g·K)
    rows = torch.matmul(m.T, patches)  # along the grid's rows: (…, s, g·K)
    columns = torch.matmul(m.T, rows.view(-1, grid, keys))  # along its columns: (…·s, s, K)
    out[..., 1:, :] = columns.view(*lead, size * size, keys)
    return out


def resize_relation(relation: Tensor, grid: int, size: int, upsampled: int | None = None) -> Tensor:
    """Resize attention-shaped maps of a `grid`² token grid (plus cls) to a `size`² one.

    Keys first, then queries (`resize_keys`, `resize_queries`), the cls row and column only along
    the other axis. The op when autograd does not record `relation`, else the matmuls (they have a
    backward): the same numbers.

    Args:
        relation: (B, H, 1 + grid², 1 + grid²).
        grid: upstream grid side.
        size: downstream grid side.
        upsampled: side after the nearest upsampling (None: 2·grid).

    Returns:
        (B, H, 1 + size², 1 + size²).
    """
    upsampled = upsampled or 2 * grid
    if relation.requires_grad:
        return _matmul_resize(relation, grid, size, upsampled)
    return _resize_relation_op(relation, grid, size, upsampled)


def _matmul_resize(relation: Tensor, grid: int, size: int, upsampled: int) -> Tensor:
    return resize_queries(resize_keys(relation, grid, size, upsampled), grid, size, upsampled)


@torch.library.custom_op("adaptive_vit::resize_relation", mutates_args=())
def _resize_relation_op(relation: Tensor, grid: int, size: int, upsampled: int) -> Tensor:
    """`resize_relation` as one op: the CPU kernel when it is built, else the matmuls."""
    compiled = kernel.cpu_kernel() if relation.device.type == "cpu" else None
    if compiled is None:
        return _matmul_resize(relation, grid, size, upsampled)
    if relation.stride(-1) != 1 or relation.stride(-2) != relation.shape[-1]:
        relation = relation.contiguous()  # the kernel reads each map as one block
    return compiled.resize_relation(relation, *resize_taps(grid, size, upsampled), grid, size)


@_resize_relation_op.register_fake
def _(relation: Tensor, grid: int, size: int, upsampled: int) -> Tensor:
    tokens = 1 + size * size
    return relation.new_empty(*relation.shape[:-2], tokens, tokens)


def resize_relation_flops(maps: int, grid: int, size: int) -> int:
    """Multiply-adds of `resize_relation` on `maps` maps: along the keys, every input row
    (1 + grid² of them) resizes its grid columns, then its grid rows, two taps per output; along
    the queries, every output patch row sums four keyed rows of 1 + size² entries."""
    rows, tokens = 1 + grid * grid, 1 + size * size
    return maps * (rows * 2 * size * (grid + size) + size * size * 4 * tokens)


def _fvcore_handle(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    shape, out = get_shape(inputs[0]), get_shape(outputs[0])
    grid, size = math.isqrt(shape[-1] - 1), math.isqrt(out[-1] - 1)
    return resize_relation_flops(math.prod(shape[:-2]), grid, size)


register_op_handle("adaptive_vit::resize_relation", _fvcore_handle)
