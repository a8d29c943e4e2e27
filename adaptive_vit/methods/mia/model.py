"""`MIAFormer`: a backbone with a MIA-Controller before every block (no Lightning here).

The backbone comes from its family as stages (`BackboneFamily.stages`): a timm DeiT is one stage
of blocks; a LeViT is three, with an attention-subsample block between two stages that always
runs. Every block gets a controller; its family of layers runs it through a `BlockOps`
(`block.ViTBlockOps`, `levit_block.LeViTBlockOps`).

Two forward paths share the controllers and the blocks:

- `forward_masked` (training): decisions as masks (hard Gumbel-softmax with straight-through
  gradients, argmax, or actions sampled from the policy for A2C), per-image cost differentiable;
- `forward_sliced` (inference, `forward_adaptive`): argmax decisions that save real compute
  (skipping images not run, kept tokens gathered, active heads' weights sliced).

Both accept `override` decisions (fixed patterns for tests and the benchmark); the controllers
still run then, so time and cost stay honest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_vit.backbones import create_vit, family_of
from adaptive_vit.methods.mia import levit_block  # noqa: F401 (registers LeViT's BlockOps)
from adaptive_vit.methods.mia.block import BlockOps, block_ops, sliced_block
from adaptive_vit.methods.mia.controller import ControllerOutput, MIAController, decide
from adaptive_vit.methods.mia.cost import MIACost, StageCost, controller_flops
from adaptive_vit.methods.network import AdaptiveNetwork, AdaptiveOutput

DIMENSIONS = ("blocks", "heads", "tokens")


class Decisions(NamedTuple):
    """Keep-decisions of every block, 1 = keep/execute (bool or float masks). Layers with fewer
    heads or tokens than the widest (LeViT's stages) fill the rest of their row with 0."""

    blocks: Tensor  # (B, L)
    heads: Tensor  # (B, L, H_max)
    tokens: Tensor  # (B, L, N_max) patch tokens (prefix tokens such as cls are always kept)


class MaskedOutput(NamedTuple):
    logits: Tensor  # (B, C)
    gflops: Tensor  # (B,) executed GFLOPs, differentiable through straight-through masks
    decisions: Decisions  # float masks as applied
    controls: list[ControllerOutput]  # per block: the controller's logits (and critic values)
    # (B,) GFLOPs of the argmax decisions of the same controller outputs, i.e. what evaluation
    # would execute (no gradient); training steers the mean cost to the target with it
    argmax_gflops: Tensor


class MIAFormer(AdaptiveNetwork):
    """MIA-Former on a backbone (docs/methods.md, "MIA-Former"; LeViT: docs/levit.md).

    Decision: the backbone's BatchNorms (LeViT's) always run on their running statistics, in
    training too (`train`): batch statistics of the masked computation would mix in dropped
    tokens, skipped images and inactive heads' zeros, and statistics over the kept tokens only
    would change with the decisions, so training and evaluation would normalise differently.
    Their weight and bias still train; the statistics stay the pretrained backbone's.

    Args:
        backbone: a model of a registered backbone family whose blocks MIA-Former runs (timm ViT
            blocks, LeViT blocks); stored as `backbone`, as `StaticViT` stores it, so a static
            checkpoint loads into it.
        skip_blocks: let the controllers skip whole blocks (the paper's Table 2 "Depth").
        skip_heads: let them skip heads ("Head").
        skip_tokens: let them skip tokens ("Token").
        pool: side of the pooled map the controller's CNN reads.
        token_global: concatenate a pooled global feature in the token branch.
        init_keep_bias: initial logit bias towards "keep".
        gumbel_tau: Gumbel-softmax temperature in training.
    """

    def __init__(
        self,
        backbone: nn.Module,
        skip_blocks: bool = True,
        skip_heads: bool = True,
        skip_tokens: bool = True,
        pool: int = 4,
        token_global: bool = True,
        init_keep_bias: float = 0.0,
        gumbel_tau: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.family = family_of(backbone)
        self.stages = self.family.stages(backbone)
        if any(len(stage.blocks) == 0 for stage in self.stages):
            raise ValueError("MIA-Former needs at least one block in every stage of the backbone.")
        self.block_ops: list[BlockOps] = [block_ops(block) for stage in self.stages for block in stage.blocks]
        self.controllers = nn.ModuleList(
            MIAController(stage.dim, stage.num_heads, stage.grid, pool, skip_blocks, skip_heads, skip_tokens,
                          token_global, init_keep_bias, stage.num_prefix_tokens)
            for stage in self.stages for _ in stage.blocks
        )
        self.heads_per_layer = [c.num_heads for c in self.controllers]  # H of each block
        self.tokens_per_layer = [c.grid[0] * c.grid[1] for c in self.controllers]  # N of each block
        self.cost = MIACost.of(self._stage_costs(), self.family.gflops(backbone))
        self.gumbel_tau = gumbel_tau
        # how `forward_train` decides: "gumbel" (stages 1-2) or "sample" (A2C, stage 3)
        self.train_decisions = "gumbel"
        # True in stage 1: each controller learns from its own decisions only. Its input then
        # carries no gradient back through earlier blocks' straight-through masks; with that path
        # open, a later controller's "keep" loss pushed earlier controllers to skip (on the demo,
        # block 2 still skipped 82 % of its tokens after stage 1: docs/performance.md)
        self.isolate_controllers = False
        # False until stage 3 has re-initialised part of the controllers (A2C weight inheritance);
        # saved, so resuming stage 3 does not re-initialise again
        self.register_buffer("policy_initialised", torch.tensor(False))

    @classmethod
    def from_name(cls, name: str, vit: dict[str, Any] | None = None, **kwargs: Any) -> MIAFormer:
        """Build on the timm ViT `backbones.create_vit(name, **vit)` (tests, scripts)."""
        return cls(create_vit(name, **(vit or {})), **kwargs)

    def _stage_costs(self) -> list[StageCost]:
        costs, first = [], 0
        for stage in self.stages:
            controller, ops = self.controllers[first], self.block_ops[first]
            patches = stage.grid[0] * stage.grid[1]
            costs.append(StageCost(len(stage.blocks), stage.num_heads, patches, stage.num_prefix_tokens,
                                   functools.partial(ops.flops, stage.blocks[0]),
                                   *controller_flops(controller, patches)))
            first += len(stage.blocks)
        return costs

    def train(self, mode: bool = True) -> MIAFormer:
        """Train mode everywhere but in the backbone's BatchNorms (see the class docstring)."""
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    @property
    def skips(self) -> dict[str, bool]:
        c = self.controllers[0]
        return {"blocks": c.skip_blocks, "heads": c.skip_heads, "tokens": c.skip_tokens}

    @property
    def depth(self) -> int:
        """L, the blocks with a controller."""
        return len(self.controllers)

    # ------------------------------------------------------------------ shared pieces

    def _embed(self, x: Tensor) -> Tensor:
        return self.family.embed(self.backbone, x)

    def _head(self, x: Tensor) -> Tensor:
        return self.family.head(self.backbone, self.family.norm(self.backbone)(x))

    def _layers(self) -> Iterator[tuple[int, nn.Module | None, nn.Module, BlockOps]]:
        """(l, what runs before block l: its stage's entry at a stage's first block, else None,
        block l, its ops)."""
        l = 0
        for stage in self.stages:
            for i, block in enumerate(stage.blocks):
                yield l, stage.entry if i == 0 else None, block, self.block_ops[l]
                l += 1

    def _gflops(self, blocks: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
        """(B, L) executed, (B, L, H_max) active heads, (B, L) kept patch-token counts → (B,)
        GFLOPs (float32: raw FLOP counts overflow half precision under AMP)."""
        return self.cost.executed(blocks.float(), heads.float(), tokens.float()) / 1e9

    def kept_fractions(self, decisions: Decisions) -> Decisions:
        """(B, L) each: executed, fraction of the block's heads kept, fraction of its tokens kept
        (differentiable through straight-through masks)."""
        heads = decisions.heads.new_tensor(self.heads_per_layer)
        tokens = decisions.tokens.new_tensor(self.tokens_per_layer)
        return Decisions(decisions.blocks, decisions.heads.sum(-1) / heads, decisions.tokens.sum(-1) / tokens)

    def _stack(self, per_layer: list[tuple[Tensor, Tensor, Tensor]]) -> Decisions:
        """Per layer (b (B,), h (B, H_l), n (B, N_l)) → `Decisions`, rows padded with 0."""
        H, N = max(self.heads_per_layer), max(self.tokens_per_layer)
        blocks, heads, tokens = zip(*per_layer)
        return Decisions(torch.stack(blocks, 1), torch.stack([F.pad(h, (0, H - h.shape[-1])) for h in heads], 1),
                         torch.stack([F.pad(n, (0, N - n.shape[-1])) for n in tokens], 1))

    # ------------------------------------------------------------------ training path

    def forward_masked(self, x: Tensor, mode: str = "gumbel", override: Decisions | None = None,
                       with_values: bool = False) -> MaskedOutput:
        """Every decision as a mask over the full computation.

        Args:
            x: images (B, C, H, W).
            mode: ``gumbel`` | ``argmax`` | ``sample`` (see `controller.decide`).
            override: decisions that replace the controllers' (the controllers still run).
            with_values: also compute the critic values (A2C).
        """
        x = self._embed(x)
        B = x.shape[0]
        ones = x.new_ones
        applied, greedy, controls = [], [], []  # per block: (b, h, n) masks; controller outputs
        for l, entry, block, ops in self._layers():
            if entry is not None:
                x = entry(x)
            controller = self.controllers[l]
            H, N = self.heads_per_layer[l], self.tokens_per_layer[l]
            out = controller(x.detach() if self.isolate_controllers else x, with_values=with_values)
            kinds = ((out.block, (B,)), (out.heads, (B, H)), (out.tokens, (B, N)))  # None: switched off
            b, h, n = (decide(lg, mode, self.gumbel_tau) if lg is not None else ones(shape) for lg, shape in kinds)
            if override is not None:
                b, h, n = (o[:, l].to(x.dtype) for o in override)
                h, n = h[:, :H], n[:, :N]
            x = ops.masked(block, x, b, h, torch.cat([ones(B, controller.prefix), n], dim=1))
            applied.append((b, h, n))
            with torch.no_grad():
                greedy.append(tuple(decide(lg, "argmax") if lg is not None else ones(shape) for lg, shape in kinds))
            controls.append(out)
        decisions, argmax = self._stack(applied), self._stack(greedy)
        gflops = self._gflops(decisions.blocks, decisions.heads, decisions.tokens.sum(-1))
        argmax_gflops = self._gflops(argmax.blocks, argmax.heads, argmax.tokens.sum(-1))
        return MaskedOutput(self._head(x), gflops, decisions, controls, argmax_gflops)

    def forward_train(self, x: Tensor) -> MaskedOutput:
        sample = self.train_decisions == "sample"
        return self.forward_masked(x, self.train_decisions, with_values=sample)

    # ------------------------------------------------------------------ inference path

    def forward_sliced(self, x: Tensor, override: Decisions | None = None) -> AdaptiveOutput:
        """Deterministic decisions with real savings (see the module docstring).

        Args:
            x: images (B, C, H, W).
            override: decisions that replace the controllers' (the controllers still run, the
                head and token branches only for the images that execute the block).
        """
        x = self._embed(x)
        B, L = x.shape[0], self.depth
        # float32 under `bf16-true` too
        executed = torch.zeros(B, L, dtype=torch.float32, device=x.device)
        heads = torch.zeros(B, L, max(self.heads_per_layer), dtype=torch.float32, device=x.device)
        tokens = torch.zeros_like(executed)
        for l, entry, block, ops in self._layers():
            if entry is not None:
                x = entry(x)
            b, samples, h, n = self._decide_sliced(self.controllers[l], x, l, override)
            x = sliced_block(block, x, samples, h, n, ops)
            executed[:, l] = b.float()
            heads[samples, l, :h.shape[1]] = h.float()
            tokens[samples, l] = n.sum(1).float()
        kept = self.kept_fractions(Decisions(executed, heads, tokens[..., None]))
        gflops = self._gflops(executed, heads, tokens)
        exit_index = torch.zeros(B, dtype=torch.long, device=x.device)
        return AdaptiveOutput(self._head(x), exit_index, gflops, kept._asdict())

    def forward_blocks(self, x: Tensor, decisions: Decisions) -> Tensor:
        """(B, classes) logits of the sliced blocks under `decisions` with no controller run: those
        of `forward_sliced(x, decisions)` (tested). A fixed pattern as a static model, for FLOPs
        checks against fvcore and to time what the blocks cost alone
        (`benchmarks/mia_controllers.py`)."""
        z = self._embed(x)
        for l, entry, block, ops in self._layers():
            if entry is not None:
                z = entry(z)
            samples = decisions.blocks[:, l].nonzero()[:, 0]
            z = sliced_block(block, z, samples, decisions.heads[samples, l, :self.heads_per_layer[l]],
                             decisions.tokens[samples, l, :self.tokens_per_layer[l]], ops)
        return self._head(z)

    def _decide_sliced(self, controller: MIAController, x: Tensor, l: int,
                       override: Decisions | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Block l's decisions on the sliced path (`MIAController.decide_sliced`): (B,) executed,
        (G,) executing images, their (G, H) heads and (G, N) tokens (bool), `override`'s if given
        (the controller still runs)."""
        if override is None:
            return controller.decide_sliced(x)
        b, samples, _, _ = controller.decide_sliced(x, executed=override.blocks[:, l].bool())
        H, N = self.heads_per_layer[l], self.tokens_per_layer[l]
        return b, samples, override.heads[samples, l, :H].bool(), override.tokens[samples, l, :N].bool()

    # ------------------------------------------------------------------ the contract

    def forward_adaptive(self, x: Tensor, thresholds: Sequence[float] = ()) -> AdaptiveOutput:
        return self.forward_sliced(x)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.forward_sliced(x).logits]

    def decision_maps(self, x: Tensor) -> dict[str, Tensor]:
        """The eval decisions as masks: ``blocks`` (B, L), ``heads`` (B, L, H_max) and ``tokens``
        (B, L, rows, cols) of kept patch tokens on the first block's grid (a later stage's coarser
        grid resampled to it, nearest), all bool. The masked path in argmax mode makes the same
        decisions as the sliced path (tested)."""
        decisions = self.forward_masked(x, mode="argmax").decisions
        grid = self.controllers[0].grid
        maps = []
        for l, controller in enumerate(self.controllers):
            kept = decisions.tokens[:, l, :self.tokens_per_layer[l]].unflatten(-1, controller.grid)  # (B, r, c)
            maps.append(F.interpolate(kept[:, None], size=grid, mode="nearest")[:, 0])
        return {"blocks": decisions.blocks.bool(), "heads": decisions.heads.bool(),
                "tokens": torch.stack(maps, 1).bool()}

    def exit_gflops(self) -> list[float]:
        """One exit: everything on, controllers included (FLOPs_total)."""
        return [self.cost.total() / 1e9]

    def static_gflops(self) -> float:
        return self.family.gflops(self.backbone)

    def input_size(self) -> tuple[int, int, int]:
        return self.family.input_size(self.backbone)

    def static_baseline(self) -> nn.Module:
        return self.backbone  # the plain timm forward on the same weights

    def benchmark_modes(self, x: Tensor) -> Iterator[tuple[str, Callable[[], AdaptiveOutput]]]:
        """The controllers' own decisions, then fixed patterns (25 % / 50 % of the tokens, heads
        or blocks skipped, the same for every image) with the controllers still running."""
        yield "controllers", lambda: self.forward_sliced(x)
        for label, override in self.fixed_patterns(x.shape[0], x.device).items():
            yield label, lambda o=override: self.forward_sliced(x, o)

    def fixed_patterns(self, batch: int, device: torch.device | None = None) -> dict[str, Decisions]:
        """The benchmark's patterns by label: all on, 25 % / 50 % of the blocks, heads or tokens
        skipped, and 25 % of each (`fixed_decisions`)."""
        patterns = {"all on": {}}
        for fraction in (0.25, 0.5):
            for dim in DIMENSIONS:
                patterns[f"{dim} -{fraction:.0%}"] = {dim: fraction}
        patterns["all -25%"] = dict.fromkeys(DIMENSIONS, 0.25)
        return {label: self.fixed_decisions(batch, **skipped, device=device) for label, skipped in patterns.items()}

    def fixed_decisions(self, batch: int, blocks: float = 0.0, heads: float = 0.0, tokens: float = 0.0,
                        device: torch.device | None = None, seed: int = 0) -> Decisions:
        """A fixed pattern skipping the given fractions (rounded) of blocks, heads and tokens.

        Skipped blocks are spread evenly, the last heads are skipped, and each image drops a
        random (seeded) set of tokens of the same size.
        """
        L, H, N = self.depth, max(self.heads_per_layer), max(self.tokens_per_layer)
        keep_b = torch.ones(L, dtype=torch.bool)
        skip = round(blocks * L)
        if skip:
            keep_b[torch.linspace(L - 1, 0, skip).round().long()] = False
        keep_h = torch.zeros(L, H, dtype=torch.bool)
        keep_n = torch.zeros(batch, L, N, dtype=torch.bool)
        generator = torch.Generator().manual_seed(seed)
        draws = torch.rand(batch, L, N, generator=generator)
        for l, (h, n) in enumerate(zip(self.heads_per_layer, self.tokens_per_layer)):
            keep_h[l, :h - round(heads * h)] = True
            keep_n[:, l, :n] = draws[:, l, :n].argsort(-1) >= round(tokens * n)
        return Decisions(keep_b.expand(batch, L).to(device), keep_h.expand(batch, L, H).to(device), keep_n.to(device))

