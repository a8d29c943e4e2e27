"""DVT's relationship resize (keys, then queries) as one op, `adaptive_vit::resize_relation`.

docs/methods.md, DVT: resizes. On CPU at inference the op runs a small compiled kernel
(`resize_relation.cpp`). The kernel exists because PyTorch has no fast form of this resize there.
Each output of the Figure-5 resize reads at most two inputs per axis. As matmuls
(`reuse.resize_keys` / `resize_queries`), two of the four passes contract a middle axis, i.e.
thousands of tiny batched products, and every pass writes a map-sized intermediate. The kernel
resizes one map at a time in cache and writes each output once. Its measured speed against the
matmuls, with the commit it was measured at: docs/performance.md, DVT.

- **When it is built.** At first use, with PyTorch's own extension builder (g++ and ninja), then
  cached (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`).
- **Without it.** If it cannot be built, a warning says why, and the op computes the same
  numbers with the matmuls. Off the CPU the op always runs the matmuls (on a GPU they are the
  fast way), and so it does when `ADAPTIVE_VIT_CPU_KERNEL=0`.
- **Training.** `resize_relation` calls the matmuls directly when autograd records the relation
  (they have a backward); the op is for inference only.

FLOPs count what the kernel computes (`resize_relation_flops`): two multiply-adds per output
along each axis, four per output row element along the 2-D query grid. An fvcore handle reports
the same count. The matmul fallback gives the same numbers with more multiply-adds by zero.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from adaptive_vit.flops import register_op_handle

SWITCH = "ADAPTIVE_VIT_CPU_KERNEL"
SOURCE = Path(__file__).with_name("resize_relation.cpp")


@functools.cache
def cpu_kernel() -> ModuleType | None:
    """The compiled CPU kernel, built on first use; None if it is switched off or cannot be built."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        # said every time, as torch does not tell in advance whether it will build or reuse
        print("adaptive-vit: loading DVT's CPU resize kernel (built on first use, ~30 s)", file=sys.stderr)
        return load("adaptive_vit_resize_relation", [str(SOURCE)],
                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, no OpenMP: fall back, say why and how to fix
        warnings.warn(
            f"DVT's CPU resize kernel could not be built ({type(error).__name__}: {error}). "
            "Relationship reuse falls back to the matmul resize: the same numbers, slower on CPU. "
            f"To build it, install g++ and ninja (`pip install ninja`); set {SWITCH}=0 to skip it.",
            stacklevel=2,
        )
        return None


@functools.cache
def resize_taps(grid: int, size: int) -> tuple[Tensor, Tensor]:
    """The 1-D Figure-5 resize `grid` → `size` as two taps per output.

    Returns:
        (size, 2) int64 input indices and (size, 2) float32 weights, so that
        out[i] = weights[i, 0]·x[taps[i, 0]] + weights[i, 1]·x[taps[i, 1]] (a single-tap output has
        a second weight of 0).
    """
    from adaptive_vit.methods.dvt.reuse import resize_matrix

    matrix = resize_matrix(grid, size)  # (grid, size)
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


def resize_relation(relation: Tensor, grid: int, size: int) -> Tensor:
    """Resize attention-shaped maps of a `grid`² token grid (plus cls) to a `size`² one.

    Keys first, then queries (`reuse.resize_keys`, `reuse.resize_queries`), the cls row and
    column only along the other axis. The op when autograd does not record `relation`, else the
    matmuls (they have a backward): the same numbers.

    Args:
        relation: (B, H, 1 + grid², 1 + grid²).
        grid: upstream grid side.
        size: downstream grid side.

    Returns:
        (B, H, 1 + size², 1 + size²).
    """
    if relation.requires_grad:
        return _matmul_resize(relation, grid, size)
    return _resize_relation_op(relation, grid, size)


def _matmul_resize(relation: Tensor, grid: int, size: int) -> Tensor:
    from adaptive_vit.methods.dvt.reuse import resize_keys, resize_queries

    return resize_queries(resize_keys(relation, grid, size), grid, size)


@torch.library.custom_op("adaptive_vit::resize_relation", mutates_args=())
def _resize_relation_op(relation: Tensor, grid: int, size: int) -> Tensor:
    """`resize_relation` as one op: the CPU kernel when it is built, else the matmuls."""
    kernel = cpu_kernel() if relation.device.type == "cpu" else None
    if kernel is None:
        return _matmul_resize(relation, grid, size)
    if relation.stride(-1) != 1 or relation.stride(-2) != relation.shape[-1]:
        relation = relation.contiguous()  # the kernel reads each map as one block
    return kernel.resize_relation(relation, *resize_taps(grid, size), grid, size)


@_resize_relation_op.register_fake
def _(relation: Tensor, grid: int, size: int) -> Tensor:
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
