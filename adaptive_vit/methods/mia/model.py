"""`MIAFormer`: a timm DeiT with a MIA-Controller before every block (no Lightning here).

Two forward paths share the controllers and the timm blocks:

- `forward_masked` (training): decisions as masks (hard Gumbel-softmax with straight-through
  gradients, argmax, or actions sampled from the policy for A2C), per-image cost differentiable;
- `forward_sliced` (inference, `forward_adaptive`): argmax decisions that save real compute
  (skipping images not run, kept tokens gathered, active heads' weights sliced).

Both accept `override` decisions (fixed patterns for tests and the benchmark); the controllers
still run then, so time and cost stay honest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from adaptive_vit.backbones import create_vit, family_of
from adaptive_vit.methods.mia.block import masked_block, sliced_block
from adaptive_vit.methods.mia.controller import ControllerOutput, MIAController, decide
from adaptive_vit.methods.mia.cost import MIACost
from adaptive_vit.methods.network import AdaptiveNetwork, AdaptiveOutput

DIMENSIONS = ("blocks", "heads", "tokens")


class Decisions(NamedTuple):
    """Keep-decisions of every block, 1 = keep/execute (bool or float masks)."""

    blocks: Tensor  # (B, L)
    heads: Tensor  # (B, L, H)
    tokens: Tensor  # (B, L, N) patch tokens (the cls token is always kept)


class MaskedOutput(NamedTuple):
    logits: Tensor  # (B, C)
    gflops: Tensor  # (B,) executed GFLOPs, differentiable through straight-through masks
    decisions: Decisions  # float masks as applied
    controls: list[ControllerOutput]  # per block: the controller's logits (and critic values)
    # (B,) GFLOPs of the argmax decisions of the same controller outputs, i.e. what evaluation
    # would execute (no gradient); training steers the mean cost to the target with it
    argmax_gflops: Tensor


class MIAFormer(AdaptiveNetwork):
    """MIA-Former on a timm ViT (docs/methods.md, "MIA-Former").

    Args:
        backbone: a timm VisionTransformer built by `backbones.create_vit` (its blocks are
            reused as MIA-Blocks; stored as `backbone`, as `StaticViT` stores it, so a static
            checkpoint loads into it).
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
        _check_backbone(backbone)
        self.backbone = backbone
        self.family = family_of(backbone)
        shape = self.family.dims(backbone)
        dims = shape.as_dict()
        self.dims = dims
        grid = shape.grid
        self.controllers = nn.ModuleList(
            MIAController(dims["dim"], dims["num_heads"], grid, pool, skip_blocks, skip_heads, skip_tokens,
                          token_global, init_keep_bias)
            for _ in range(dims["depth"])
        )
        self.cost = MIACost.of(dims, self.controllers[0])
        self.gumbel_tau = gumbel_tau
        # how `forward_train` decides: "gumbel" (stages 1-2) or "sample" (A2C, stage 3)
        self.train_decisions = "gumbel"
        # False until stage 3 has re-initialised part of the controllers (A2C weight inheritance);
        # saved, so resuming stage 3 does not re-initialise again
        self.register_buffer("policy_initialised", torch.tensor(False))

    @classmethod
    def from_name(cls, name: str, vit: dict[str, Any] | None = None, **kwargs: Any) -> MIAFormer:
        """Build on the timm ViT `backbones.create_vit(name, **vit)` (tests, scripts)."""
        return cls(create_vit(name, **(vit or {})), **kwargs)

    @property
    def skips(self) -> dict[str, bool]:
        c = self.controllers[0]
        return {"blocks": c.skip_blocks, "heads": c.skip_heads, "tokens": c.skip_tokens}

    # ------------------------------------------------------------------ shared pieces

    def _embed(self, x: Tensor) -> Tensor:
        return self.family.embed(self.backbone, x)

    def _head(self, x: Tensor) -> Tensor:
        return self.family.head(self.backbone, self.family.norm(self.backbone)(x))

    def _gflops(self, blocks: Tensor, heads: Tensor, tokens: Tensor) -> Tensor:
        """(B, L) executed, head counts, kept patch-token counts → (B,) GFLOPs (float32: raw FLOP
        counts overflow half precision under AMP)."""
        return self.cost.executed(blocks.float(), heads.float(), tokens.float()) / 1e9

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
        H, N = self.dims["num_heads"], self.dims["num_patches"]
        ones = x.new_ones
        applied, greedy, controls = [], [], []  # per block: (b, h, n) masks; controller outputs
        for l, (controller, block) in enumerate(zip(self.controllers, self.family.blocks(self.backbone))):
            out = controller(x, with_values=with_values)
            kinds = ((out.block, (B,)), (out.heads, (B, H)), (out.tokens, (B, N)))  # None: switched off
            b, h, n = (decide(lg, mode, self.gumbel_tau) if lg is not None else ones(shape) for lg, shape in kinds)
            if override is not None:
                b, h, n = (o[:, l].to(x.dtype) for o in override)
            x = masked_block(block, x, b, h, torch.cat([ones(B, 1), n], dim=1))
            applied.append((b, h, n))
            with torch.no_grad():
                greedy.append(tuple(decide(lg, "argmax") if lg is not None else ones(shape) for lg, shape in kinds))
            controls.append(out)
        decisions = Decisions(*(torch.stack(m, 1) for m in zip(*applied)))
        argmax = Decisions(*(torch.stack(m, 1) for m in zip(*greedy)))
        gflops = self._gflops(decisions.blocks, decisions.heads.sum(-1), decisions.tokens.sum(-1))
        argmax_gflops = self._gflops(argmax.blocks, argmax.heads.sum(-1), argmax.tokens.sum(-1))
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
        B, L = x.shape[0], self.dims["depth"]
        H, N = self.dims["num_heads"], self.dims["num_patches"]
        executed = torch.zeros(B, L, dtype=torch.float32, device=x.device)  # float32 under `bf16-true` too
        heads, tokens = torch.zeros_like(executed), torch.zeros_like(executed)
        for l, (controller, block) in enumerate(zip(self.controllers, self.family.blocks(self.backbone))):
            b, samples, h, n = self._decide_sliced(controller, x, l, override)
            x = sliced_block(block, x, samples, h, n)
            executed[:, l] = b.float()
            heads[samples, l] = h.sum(1).float()
            tokens[samples, l] = n.sum(1).float()
        decisions = {"blocks": executed, "heads": heads / H, "tokens": tokens / N}
        gflops = self._gflops(executed, heads, tokens)
        exit_index = torch.zeros(B, dtype=torch.long, device=x.device)
        return AdaptiveOutput(self._head(x), exit_index, gflops, decisions)

    def forward_blocks(self, x: Tensor, decisions: Decisions) -> Tensor:
        """(B, classes) logits of the sliced blocks under `decisions` with no controller run: those
        of `forward_sliced(x, decisions)` (tested). A fixed pattern as a static model, for FLOPs
        checks against fvcore and to time what the blocks cost alone
        (`benchmarks/mia_controllers.py`)."""
        z = self._embed(x)
        for l, block in enumerate(self.family.blocks(self.backbone)):
            samples = decisions.blocks[:, l].nonzero()[:, 0]
            z = sliced_block(block, z, samples, decisions.heads[samples, l], decisions.tokens[samples, l])
        return self._head(z)

    def _decide_sliced(self, controller: MIAController, x: Tensor, l: int,
                       override: Decisions | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Block l's decisions on the sliced path (`MIAController.decide_sliced`): (B,) executed,
        (G,) executing images, their (G, H) heads and (G, N) tokens (bool), `override`'s if given
        (the controller still runs)."""
        if override is None:
            return controller.decide_sliced(x)
        b, samples, _, _ = controller.decide_sliced(x, executed=override.blocks[:, l].bool())
        return b, samples, override.heads[samples, l].bool(), override.tokens[samples, l].bool()

    # ------------------------------------------------------------------ the contract

    def forward_adaptive(self, x: Tensor, thresholds: Sequence[float] = ()) -> AdaptiveOutput:
        return self.forward_sliced(x)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.forward_sliced(x).logits]

    def decision_maps(self, x: Tensor) -> dict[str, Tensor]:
        """The eval decisions as masks: ``blocks`` (B, L), ``heads`` (B, L, H) and ``tokens``
        (B, L, rows, cols) of kept patch tokens on the patch grid, all bool. The masked path in
        argmax mode makes the same decisions as the sliced path (tested)."""
        decisions = self.forward_masked(x, mode="argmax").decisions
        grid = self.family.dims(self.backbone).grid
        return {"blocks": decisions.blocks.bool(), "heads": decisions.heads.bool(),
                "tokens": decisions.tokens.bool().unflatten(-1, grid)}

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
        L, H, N = self.dims["depth"], self.dims["num_heads"], self.dims["num_patches"]
        keep_b = torch.ones(L, dtype=torch.bool)
        skip = round(blocks * L)
        if skip:
            keep_b[torch.linspace(L - 1, 0, skip).round().long()] = False
        keep_h = torch.arange(H) < H - round(heads * H)
        generator = torch.Generator().manual_seed(seed)
        order = torch.rand(batch, L, N, generator=generator).argsort(-1)
        keep_n = order >= round(tokens * N)
        return Decisions(
            keep_b.expand(batch, L).to(device),
            keep_h.expand(batch, L, H).to(device),
            keep_n.to(device),
        )


def _check_backbone(backbone: nn.Module) -> None:
    """MIA-Blocks slice timm's plain pre-norm block: refuse variants they would get wrong."""
    if getattr(backbone, "num_prefix_tokens", 1) != 1 or getattr(backbone, "global_pool", "token") != "token":
        raise ValueError("MIA-Former needs a ViT with exactly one cls token and cls-token pooling (e.g. DeiT).")
    block = backbone.blocks[0]
    plain = all(isinstance(m, nn.Identity) for m in (block.ls1, block.ls2, block.attn.norm, block.mlp.norm))
    gated = getattr(block.attn, "gate", None) is not None
    if not plain or gated:
        raise ValueError(
            "MIA-Former slices plain timm blocks; this backbone has layer scale, a scale norm or "
            "gated attention. Use a DeiT/ViT backbone without them (e.g. deit_small_patch16_224)."
        )
