"""The MIA-Controller: before every block, logits to skip the block, its heads and its tokens.

Paper (Sec. 3.2) and docs/methods.md, MIA-Former: controller:

- block/head branch: the patch tokens as a (B, D, √N, √N) map → CNN_b (two 3×3 convolutions
  D → D/4 → D/4 with activations, then global average pooling) → F_b of width D/4 = H·E'
  (E' = E/4); FC_b: F_b → 2 logits (skip, keep); FC_h1: F_b → H·E'; FC_h2 per head: E' → 2;
- token branch (DynamicViT-style): per token LN → Linear(D, D/4) → GELU → Linear(D/4, D/4),
  a pooled global feature concatenated, FC_n: 2 logits per patch token (the cls token is never
  decided: it is always kept).

Decision (docs/methods.md, MIA-Former: controller; the controllers stay ≤ 5 % of the backbone):
the map is average-pooled to `pool`×`pool` (4×4) before CNN_b. At the full 14×14 resolution the
two convolutions would cost ≈ 0.98 GFLOPs over DeiT-S's 12 blocks (≈ 21 %); pooled they cost
≈ 0.08 GFLOPs. The pooling is one fixed (pool², N) matrix applied on the token axis, the numbers
of `AdaptiveAvgPool2d` on the (B, D, √N, √N) map without transposing the tokens into a map first
(at batch 1 on CPU that copy and the pool kernel took longer than the matmul). The
convolutions stay on that row layout too (`RowConv3x3`: the numbers of `nn.Conv2d`, faster at
batch 1 on CPU). Measured times, with their commits: docs/performance.md, MIA-Former.

Decision: GELU after each convolution and in the token MLP (the paper says "activations" and
DynamicViT uses GELU). Decision: the token branch's global feature is the mean of F_n over the
patch tokens (DynamicViT concatenates a pooled feature the same way), on by default.

Logit index 1 means "keep/execute", index 0 "skip". For A2C (stage 3) every last layer (FC_b,
FC_h2, FC_n) has a parallel critic head (one value per decision); the actor is the FC itself.
The critics exist in every stage (so checkpoints of all stages share one layout) but only stage 3
uses and trains them.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ControllerOutput(NamedTuple):
    """Raw controller outputs; a switched-off dimension has None."""

    block: Tensor | None  # (B, 2) logits (skip, keep)
    heads: Tensor | None  # (B, H, 2)
    tokens: Tensor | None  # (B, N, 2), patch tokens only
    values: dict[str, Tensor] | None = None  # critic values: block (B,), heads (B, H), tokens (B, N)


class PerHeadLinear(nn.Module):
    """One small linear layer per head: (B, H, in) → (B, H, out) (FC_h2 and its critic).

    A batched matmul over the heads, so fvcore counts it as H·in·out per image.

    Args:
        num_heads: H.
        in_features: per-head input width (E').
        out_features: per-head outputs.
    """

    def __init__(self, num_heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_heads, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, per head
        bound = 1 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        # (H, B, in) @ (H, in, out) → (H, B, out) → (B, H, out)
        return (x.transpose(0, 1) @ self.weight).transpose(0, 1) + self.bias


class RowConv3x3(nn.Conv2d):
    """A 3×3 convolution with padding 1 on a small map held as rows: (B, h·w, C) → (B, h·w, C_out),
    the numbers (and the parameters) of `nn.Conv2d(C, C_out, 3, padding=1)` on the (B, C, h, w) map.

    Two matmuls: every input position times every tap's weights, (B, P, C) @ (C, 9·C_out), then
    each output position sums its nine taps through a fixed 0/1 (P, 9·P) matrix. At batch 1 on CPU
    this is faster than the convolution kernel on a 4×4 map, and no slower at batch 64. The tap
    sums count as the matmul they are (P·9P·C_out multiply-adds, `cost.controller_flops`):
    summing by gather and `sum` instead would count only the convolution's but was slower at
    batch 64 (measured: docs/performance.md, MIA-Former). The weight in the taps layout is
    a copy; without autograd it is cached and rebuilt when the weight changes (an optimizer step or
    a loaded checkpoint bumps its version).

    Args:
        in_channels: C.
        out_channels: C_out.
        size: (h, w) of the map.
    """

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int]) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.register_buffer("tap_sum", tap_sum_matrix(size), persistent=False)
        self._cached_taps: tuple[tuple[int, int], Tensor] | None = None

    def taps_weight(self) -> Tensor:
        """(C, 9·C_out): column o·C_out + d holds tap o (row-major in the 3×3 kernel) of output d."""
        weight = self.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight.permute(1, 2, 3, 0).flatten(1)
        key = (weight.data_ptr(), weight._version)
        if self._cached_taps is None or self._cached_taps[0] != key:
            # a normal tensor even under `torch.inference_mode`, so a later forward that records
            # gradients for the input only (an attack on frozen weights) can still use it
            with torch.inference_mode(False), torch.no_grad():
                self._cached_taps = (key, weight.permute(1, 2, 3, 0).flatten(1))
        return self._cached_taps[1]

    def forward(self, rows: Tensor) -> Tensor:
        batch, positions, _ = rows.shape
        taps = (rows @ self.taps_weight().to(rows.dtype)).view(batch, positions * 9, self.out_channels)
        return (self.tap_sum.to(rows.dtype) @ taps).add_(self.bias)  # (B, P, C_out)


def tap_sum_matrix(size: tuple[int, int]) -> Tensor:
    """(P, 9·P) 0/1 matrix S, P = h·w: S[q, p·9 + o] = 1 when input position p is tap o of output
    position q for a 3×3 kernel with zero padding 1 (row-major positions and taps)."""
    h, w = size
    matrix = torch.zeros(h * w, h * w * 9, dtype=torch.float32)
    for i, j, kh, kw in itertools.product(range(h), range(w), range(3), range(3)):
        row, col = i + kh - 1, j + kw - 1
        if 0 <= row < h and 0 <= col < w:
            matrix[i * w + j, (row * w + col) * 9 + kh * 3 + kw] = 1
    return matrix


class MIAController(nn.Module):
    """Controller l: logits for block l's block, head and token decisions.

    Args:
        dim: token width D.
        num_heads: H.
        grid: patch grid (rows, cols), N = rows·cols.
        pool: side of the pooled map CNN_b reads (4 → 4×4), clipped to the grid.
        skip_blocks: decide whether to skip the block (off: never skipped, no FC_b).
        skip_heads: decide each head (off: all heads run, no FC_h1/FC_h2).
        skip_tokens: decide each patch token (off: all tokens run, no token branch).
        token_global: concatenate the mean token feature to each token's (DynamicViT).
        init_keep_bias: initial bias towards "keep" on every decision's logits (0: unbiased).
        num_prefix_tokens: tokens before the patch tokens (a class token: 1; LeViT: 0), never
            decided (always kept) and not read.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        pool: int = 4,
        skip_blocks: bool = True,
        skip_heads: bool = True,
        skip_tokens: bool = True,
        token_global: bool = True,
        init_keep_bias: float = 0.0,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        if dim // 4 < num_heads:
            raise ValueError(f"MIA-Former needs the width ({dim}) at least 4·heads ({4 * num_heads}): E' = E/4.")
        if pool < 1:
            raise ValueError(f"the controller's pooled map needs a side of at least 1 (controller_pool), got {pool}.")
        # what `fresh` rebuilds (stage 3 re-initialises part of the weights from a fresh controller)
        self.config = dict(dim=dim, num_heads=num_heads, grid=tuple(grid), pool=pool, skip_blocks=skip_blocks,
                           skip_heads=skip_heads, skip_tokens=skip_tokens, token_global=token_global,
                           init_keep_bias=init_keep_bias, num_prefix_tokens=num_prefix_tokens)
        self.dim, self.num_heads, self.grid = dim, num_heads, tuple(grid)
        self.prefix = num_prefix_tokens
        self.pool_size = (min(pool, grid[0]), min(pool, grid[1]))
        self.reduced = dim // 4  # D/4 = H·E'
        # E' = E/4, rounded down when H does not divide D/4 (LeViT-192's 288 channels, 5 heads: 14)
        self.head_reduced = self.reduced // num_heads
        self.skip_blocks, self.skip_heads, self.skip_tokens = skip_blocks, skip_heads, skip_tokens
        self.token_global = token_global
        r, e = self.reduced, self.head_reduced
        if skip_blocks or skip_heads:
            self.register_buffer("pool_matrix", pool_matrix(self.grid, self.pool_size), persistent=False)
            self.cnn = nn.Sequential(
                RowConv3x3(dim, r, self.pool_size), nn.GELU(),
                RowConv3x3(r, r, self.pool_size), nn.GELU(),
            )
        if skip_blocks:
            self.fc_b = nn.Linear(r, 2)
            self.critic_b = nn.Linear(r, 1)
        if skip_heads:
            self.fc_h1 = nn.Linear(r, num_heads * e)
            self.fc_h2 = PerHeadLinear(num_heads, e, 2)
            self.critic_h = PerHeadLinear(num_heads, e, 1)
        if skip_tokens:
            self.mlp_n = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, r), nn.GELU(), nn.Linear(r, r), nn.GELU())
            token_in = 2 * r if token_global else r
            self.fc_n = nn.Linear(token_in, 2)
            self.critic_n = nn.Linear(token_in, 1)
        self.init_keep_bias = init_keep_bias
        self._bias_towards_keep()

    def _bias_towards_keep(self) -> None:
        with torch.no_grad():
            for fc in self.actors():
                fc.bias[..., 1] += self.init_keep_bias

    def fresh(self) -> MIAController:
        """A newly initialised controller of the same shape, on the same device."""
        return MIAController(**self.config).to(next(self.parameters()).device)

    def actors(self) -> list[nn.Module]:
        """The last layer of each enabled branch (FC_b, FC_h2, FC_n): the A2C actors."""
        return [getattr(self, n) for n in ("fc_b", "fc_h2", "fc_n") if hasattr(self, n)]

    def critics(self) -> list[nn.Module]:
        return [getattr(self, n) for n in ("critic_b", "critic_h", "critic_n") if hasattr(self, n)]

    def features(self, x: Tensor) -> Tensor:
        """F_b: (B, P+N, D) → (B, D/4) (CNN_b on the pooled patch map, then global mean)."""
        pooled = self.pool_matrix.to(x.dtype) @ x[:, self.prefix:]  # (B, pool², D): the map's positions as rows
        return self.cnn(pooled).mean(dim=1)

    def block_logits(self, f_b: Tensor) -> Tensor:
        return self.fc_b(f_b)  # (B, 2)

    def head_features(self, f_b: Tensor) -> Tensor:
        return self.fc_h1(f_b).reshape(f_b.shape[0], self.num_heads, self.head_reduced)  # (B, H, E')

    def token_features(self, x: Tensor) -> Tensor:
        """(B, P+N, D) → (B, N, D/4 or D/2): per patch token, plus the global mean feature."""
        f = self.mlp_n(x[:, self.prefix:])
        if self.token_global:
            f = torch.cat([f, f.mean(dim=1, keepdim=True).expand_as(f)], dim=-1)
        return f

    def decide_sliced(self, x: Tensor, executed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Argmax decisions for the sliced inference path: the head and token branches run on the
        images that execute the block only.

        Few kernels on purpose (at batch 1 a controller's time is its kernel count): decisions
        straight from argmax (ties skip, as `decide`), no indexing when every image executes.

        Args:
            x: block input (B, P+N, D).
            executed: (B,) bool, which images execute the block, in place of the block decision
                (an override: the block branch still runs).

        Returns:
            (B,) executed, (G,) indices of the executing images, their (G, H) heads and (G, N)
            tokens to keep (bool).
        """
        B = x.shape[0]
        f_b = self.features(x) if hasattr(self, "cnn") else None
        if self.skip_blocks:
            b = self.block_logits(f_b).argmax(-1).bool()
        else:
            b = torch.ones(B, dtype=torch.bool, device=x.device)
        if executed is not None:
            b = executed
        samples = b.nonzero()[:, 0]
        G = samples.numel()
        everyone = G == B
        if self.skip_heads and G:
            f_g = f_b if everyone else f_b[samples]
            h = self.fc_h2(self.head_features(f_g)).argmax(-1).bool()
        else:
            h = torch.ones(G, self.num_heads, dtype=torch.bool, device=x.device)
        if self.skip_tokens and G:
            n = self.fc_n(self.token_features(x if everyone else x[samples])).argmax(-1).bool()
        else:
            n = torch.ones(G, self.grid[0] * self.grid[1], dtype=torch.bool, device=x.device)
        return b, samples, h, n

    def forward(self, x: Tensor, with_values: bool = False) -> ControllerOutput:
        """All enabled branches on every sample (the masked training path).

        Args:
            x: block input (B, P+N, D).
            with_values: also run the critic heads (A2C, stage 3).
        """
        f_b = self.features(x) if hasattr(self, "cnn") else None
        f_h = self.head_features(f_b) if self.skip_heads else None
        f_n = self.token_features(x) if self.skip_tokens else None
        values = None
        if with_values:
            values = {}
            if self.skip_blocks:
                values["block"] = self.critic_b(f_b)[:, 0]
            if self.skip_heads:
                values["heads"] = self.critic_h(f_h)[..., 0]
            if self.skip_tokens:
                values["tokens"] = self.critic_n(f_n)[..., 0]
        return ControllerOutput(
            block=self.fc_b(f_b) if self.skip_blocks else None,
            heads=self.fc_h2(f_h) if self.skip_heads else None,
            tokens=self.fc_n(f_n) if self.skip_tokens else None,
            values=values,
        )


def pool_matrix(grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(size², N) matrix M with M @ tokens = adaptive average pooling of the (rows, cols) token
    map to `size` (row-major on both sides)."""
    n = grid[0] * grid[1]
    return F.adaptive_avg_pool2d(torch.eye(n, dtype=torch.float32).view(n, 1, *grid), size).view(n, -1).T.contiguous()


def decide(logits: Tensor, mode: str, tau: float = 1.0) -> Tensor:
    """Keep-masks from (…, 2) logits.

    Args:
        logits: (..., 2) (skip, keep).
        mode: ``gumbel`` (hard Gumbel-softmax with straight-through gradients, training),
            ``argmax`` (deterministic, eval) or ``sample`` (an action drawn from the policy,
            no gradient: A2C).
        tau: Gumbel-softmax temperature.

    Returns:
        (...) float mask, 1 = keep.
    """
    if mode == "gumbel":
        return F.gumbel_softmax(logits.float(), tau=tau, hard=True)[..., 1].to(logits.dtype)
    if mode == "argmax":
        return (logits[..., 1] > logits[..., 0]).to(logits.dtype)
    if mode == "sample":
        return torch.distributions.Categorical(logits=logits.float()).sample().to(logits.dtype)
    raise ValueError(f"unknown decision mode {mode!r}: use 'gumbel', 'argmax' or 'sample'.")
