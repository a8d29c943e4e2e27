"""The project's FLOPs convention, measured (fvcore) and analytic.

Convention (docs/methods.md, FLOPs convention): one multiply-add = one FLOP (fvcore's), GFLOPs
per image, eval mode, attention matmuls counted. fvcore has no handle for
`scaled_dot_product_attention` (it would count 0 and DeiT-S would come out at 4.25 instead of
4.608), so one is registered here; its `matmul`
handle undercounts a broadcast product such as (s, g) @ (B, g, g) (it multiplies the first
operand's size by the last dimension), so that one is replaced by an exact count, and so is `mm`
(fvcore's refuses `mm(a, b, out=c)`, which DVT's relationship reuse runs). Norms count 5
FLOPs per element (fvcore's affine norm estimate); activations, softmax, additions count 0.

The analytic formulas below follow the same convention term by term, so a method can compute the
cost of what it executed per image (e.g. MIA-Former's skipped heads and tokens) and a test can
check the formula against fvcore on a static model of the same shape.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

NORM_FLOPS_PER_ELEMENT = 5


def _sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle: q·kᵀ and attn·v of `scaled_dot_product_attention`."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _product_flop_jit(operand: int) -> Callable[[list[Any], list[Any]], int]:
    """fvcore handle of a (broadcast, batched) matrix product whose left factor is input
    `operand`: multiply-adds = output elements × inner size."""

    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        from fvcore.nn.jit_handles import get_shape

        return math.prod(get_shape(outputs[0])) * get_shape(inputs[operand])[-1]

    return handle


_OP_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {}


def register_op_handle(op: str, handle: Callable[[list[Any], list[Any]], int]) -> None:
    """Have `fvcore_gflops` count the custom op `op` (e.g. ``"adaptive_vit::resize_relation"``)
    with `handle(inputs, outputs)` → multiply-adds; fvcore would count it as 0."""
    _OP_HANDLES[op] = handle


def fvcore_gflops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """GFLOPs per image of `model(*inputs)` in eval mode, counted by fvcore (attention included)."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counter = FlopCountAnalysis(model, inputs)
            counter.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
            counter.set_op_handle("aten::matmul", _product_flop_jit(0))
            counter.set_op_handle("aten::mm", _product_flop_jit(0))
            for op, handle in _OP_HANDLES.items():
                counter.set_op_handle(op, handle)
            counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = counter.total()
    finally:
        model.train(was_training)
    return total / inputs[0].shape[0] / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- analytic


def norm_flops(tokens: float, dim: float) -> float:
    return NORM_FLOPS_PER_ELEMENT * tokens * dim


def attention_flops(tokens: float, dim: float, active_heads: float, head_dim: int,
                    kv_tokens: float | None = None) -> float:
    """qkv + q·kᵀ + attn·v + proj, for `active_heads` heads of width `head_dim`.

    Linear in the number of active heads: qkv computes 3·h·E outputs from all D inputs, the proj
    reads h·E inputs and writes all D channels.
    """
    kv = tokens if kv_tokens is None else kv_tokens
    inner = active_heads * head_dim
    return tokens * dim * 3 * inner + 2 * tokens * kv * inner + tokens * inner * dim


def mlp_flops(tokens: float, dim: float, hidden: float, active_fraction: float = 1.0) -> float:
    """fc1 + fc2. With head-grouped channels (MIA-Former) a fraction f of the groups reads f·D
    channels and computes f·M hidden units: cost ∝ f²."""
    return 2 * tokens * (active_fraction * dim) * (active_fraction * hidden)


def block_flops(tokens: float, dim: int, num_heads: int, mlp_hidden: int,
                active_heads: float | None = None) -> float:
    """One pre-norm transformer block: norm1, attention, norm2, MLP."""
    heads = num_heads if active_heads is None else active_heads
    head_dim = dim // num_heads
    return (
        2 * norm_flops(tokens, dim)
        + attention_flops(tokens, dim, heads, head_dim)
        + mlp_flops(tokens, dim, mlp_hidden, heads / num_heads)
    )


def patch_embed_flops(num_patches: int, dim: int, patch_size: int, in_chans: int = 3) -> float:
    return num_patches * in_chans * patch_size * patch_size * dim


def vit_flops(num_patches: int, dim: int, depth: int, num_heads: int, mlp_hidden: int,
              num_classes: int, patch_size: int, in_chans: int = 3,
              num_prefix_tokens: int = 1) -> float:
    """A plain ViT (timm `VisionTransformer` with a cls token): FLOPs per image."""
    tokens = num_patches + num_prefix_tokens
    return (
        patch_embed_flops(num_patches, dim, patch_size, in_chans)
        + depth * block_flops(tokens, dim, num_heads, mlp_hidden)
        + norm_flops(tokens, dim)  # final norm runs on every token in timm
        + dim * num_classes
    )
