"""`DVT`: a cascade of transformers on growing token grids, with feature and relationship reuse.

docs/methods.md, "DVT: network" and "DVT: inference and cost" (Wang et al., NeurIPS 2021). K full
backbones of one family, no weights shared, each with its own tokenizer (default 7×7, 10×10, 14×14
tokens on a 224 image: for a timm ViT, patch convolutions 32, 23 with padding 3, and 16, as the
authors' DeiT code; for a T2T-ViT, first soft splits 14/8/3, 11/6/5 and 7/4/2 given as per-exit
backbone kwargs, as their T2T code). Exit k reuses from exit k−1 only (features and
attention logits, see `reuse.py`). Inference is a real early exit: an image answers at the first
exit whose max softmax reaches that exit's threshold, and only the images still running are
passed on, with their upstream tokens and logits indexed accordingly.

Attention kernels: a model that feeds a downstream relationship reuse computes explicit logits
(`tap="logits"`); the others (the last exit) run the configured kernel (fused SDPA by default) with
the reuse term as an additive `attn_mask`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from adaptive_vit.backbones import BackboneSpec, build_backbone, family_of
from adaptive_vit.methods.dvt.reuse import FeatureReuse, RelationReuse, ReuseBlock
from adaptive_vit.methods.network import AdaptiveNetwork, AdaptiveOutput, fraction_threshold


class Handoff(NamedTuple):
    """What an exit hands to the next one."""

    tokens: Tensor  # (B, N, D) patch tokens of the last block, before the final norm
    logits: Tensor | None  # (B, H·L, 1+N, 1+N) pre-softmax logits of all layers, or None

    def select(self, keep: Tensor) -> Handoff:
        """The rows of the images in `keep` (bool (B,) or indices)."""
        return Handoff(self.tokens[keep], None if self.logits is None else self.logits[keep])


def build_tokenized_vit(spec: BackboneSpec, num_classes: int, img_size: int, patch_size: int | None = None,
                        padding: int = 0, exit_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The backbone of `spec` with one exit's tokenizer: a patch convolution of kernel = stride =
    `patch_size` and zero `padding` on each side (timm ViTs; the authors' 10×10 tokenizer on 224:
    23 with padding 3), and/or backbone kwargs of this exit (T2T-ViT: ``{soft_split: [11, 6, 5]}``).

    Args:
        spec: the backbone every exit is built as (its img_size and patch_size are set here).
        num_classes: classifier outputs.
        img_size: input side.
        patch_size: patch convolution kernel and stride (None: the family's own tokenizer).
        padding: zero padding on each side of the image before the patch convolution.
        exit_kwargs: backbone kwargs of this exit, over ``spec.kwargs``.
    """
    padded = img_size + 2 * padding
    if padding and (patch_size is None or padded % patch_size):
        raise ValueError(
            f"patch {patch_size} with padding {padding} does not tile a {img_size}-pixel image "
            f"({padded} pixels after padding is not a multiple of {patch_size}). Choose "
            f"padding so that img_size + 2*padding is a multiple of the patch size."
        )
    # Built for the padded image (grid and position embedding fit), then told to pad itself.
    exit_spec = spec.with_(img_size=padded, patch_size=patch_size, kwargs={**spec.kwargs, **(exit_kwargs or {})})
    vit, family = build_backbone(exit_spec, num_classes)
    if family.dims(vit).num_prefix_tokens != 1:
        raise ValueError(
            f"DVT needs backbones with exactly one cls token; {spec.name!r} has "
            f"{family.dims(vit).num_prefix_tokens} prefix tokens (use a deit_*/vit_* model without a "
            "distillation or register token)."
        )
    if padding:  # a timm ViT's patch convolution (the only family DVT pads)
        if not isinstance(getattr(getattr(vit, "patch_embed", None), "proj", None), nn.Conv2d):
            raise ValueError(f"{spec.name!r} has no patch convolution to pad: set `paddings: null` and give "
                             "each exit's tokenizer in `exit_kwargs`.")
        vit.patch_embed.proj.padding = (padding, padding)
        vit.patch_embed.img_size = (img_size, img_size)
    return vit


class DVTExit(nn.Module):
    """One transformer of the cascade: a backbone plus what it reuses from its upstream.

    Args:
        vit: its backbone (`build_tokenized_vit`), with its own tokenizer, cls, pos embed, blocks,
            norm and head.
        upstream_grid: side of the upstream model's token grid; None for the first exit.
        feature_reuse: concatenate f_l(upstream tokens) into every block's MLP branch.
        relation_reuse: add the reused upstream logits to every block's attention logits.
        reuse_hidden: hidden width of f_l (128).
        reuse_dim: channels reused per block (48).
        upsampled: side of the nearest upsampling in the reuse resizes (None: 2·upstream_grid).
    """

    def __init__(self, vit: nn.Module, upstream_grid: int | None = None, feature_reuse: bool = True,
                 relation_reuse: bool = True, reuse_hidden: int = 128, reuse_dim: int = 48,
                 upsampled: int | None = None) -> None:
        super().__init__()
        self.vit = vit
        self.family = family_of(vit)
        dims = self.family.dims(vit)
        self.grid = dims.grid[0]
        self.feature_reuse = feature_reuse and upstream_grid is not None
        blocks = self.family.blocks(vit)
        if self.feature_reuse:
            for i, block in enumerate(blocks):  # each block wrapped in place, under the same key
                blocks[i] = ReuseBlock(block, FeatureReuse(dims.dim, upstream_grid, self.grid, reuse_hidden,
                                                           reuse_dim, block.norm1.eps, upsampled))
        self.relation_reuse = (
            RelationReuse(dims.num_heads, dims.depth, upstream_grid, self.grid, upsampled)
            if relation_reuse and upstream_grid is not None else None
        )

    def forward(self, x: Tensor, upstream: Handoff | None = None,
                hand_logits: bool = False) -> tuple[Tensor, Handoff]:
        """Classify `x`; return the logits and what the next exit reuses.

        Args:
            x: (B, C, H, W) images.
            upstream: the previous exit's handoff for these images (None for the first exit).
            hand_logits: compute explicit attention logits for a downstream relationship reuse.
        Returns:
            (B, classes) logits and the `Handoff` (logits None unless `hand_logits`).
        """
        vit, family = self.vit, self.family
        blocks = family.blocks(vit)
        z = family.embed(vit, x)  # (B, 1+N, D)
        masks = [None] * len(blocks)  # one additive (B, H, 1+N, 1+N) term per block, or None
        if self.relation_reuse is not None:
            masks = self.relation_reuse(upstream.logits)
        extra = {"upstream": upstream.tokens} if self.feature_reuse else {}
        logits = []
        for block, mask in zip(blocks, masks):
            if hand_logits:
                z, layer_logits = block(z, attn_mask=mask, tap="logits", **extra)  # (B, H, 1+N, 1+N)
                logits.append(layer_logits)
            else:
                z = block(z, attn_mask=mask, **extra)
        out = family.head(vit, family.norm(vit)(z))
        return out, Handoff(z[:, 1:], torch.cat(logits, dim=1) if hand_logits else None)

    def gflops(self) -> float:
        """GFLOPs per image of this exit alone, its reuse modules included."""
        flops = self.family.gflops(self.vit) * 1e9
        if self.feature_reuse:
            tokens = self.family.dims(self.vit).num_patches + 1
            flops += sum(block.flops(tokens) for block in self.family.blocks(self.vit))
        if self.relation_reuse is not None:
            flops += self.relation_reuse.flops()
        return flops / 1e9


class DVT(AdaptiveNetwork):
    """A cascade of `DVTExit`s with real early exit (see the module docstring).

    Args:
        exits: the cascade, coarsest first; exit k reuses from exit k−1.
        baseline: `build_tokenized_vit` arguments of the plain backbone DVT is judged against.
    """

    def __init__(self, exits: Sequence[DVTExit], baseline: dict[str, Any]) -> None:
        self.exit_names = tuple(f"{e.grid}x{e.grid}" for e in exits)  # read by the base __init__
        super().__init__()
        self.exits = nn.ModuleList(exits)
        self.baseline = baseline

    @classmethod
    def from_spec(
        cls,
        spec: BackboneSpec,
        num_classes: int,
        img_size: int = 224,
        patch_sizes: Sequence[int] | None = (32, 23, 16),
        paddings: Sequence[int] | None = (0, 3, 0),
        feature_reuse: bool = True,
        relation_reuse: bool = True,
        reuse_hidden: int = 128,
        reuse_dim: int = 48,
        exit_kwargs: Sequence[dict[str, Any]] | None = None,
        reuse_upsample: Sequence[int] | None = None,
    ) -> DVT:
        """Build the cascade: every exit is the backbone of `spec` at its own token grid.

        Args:
            spec: the backbone of every exit (its img_size and patch_size are set per exit).
            num_classes: classifier outputs.
            img_size: input side (the same image for every exit).
            patch_sizes: patch convolution size per exit, coarsest first (None: the family's
                tokenizer, set per exit by `exit_kwargs`).
            paddings: zero padding per exit (None: no padding anywhere).
            feature_reuse: feature reuse on (False: ablation).
            relation_reuse: relationship reuse on (False: ablation).
            reuse_hidden: hidden width of each f_l.
            reuse_dim: channels each f_l reuses.
            exit_kwargs: backbone kwargs per exit, coarsest first (T2T-ViT: its first soft split,
                ``{soft_split: [14, 8, 3]}``...); None: none.
            reuse_upsample: per exit after the first, the side of the nearest upsampling before
                the pooling in its reuse resizes (None: twice its upstream grid; the authors':
                14 into a 10×10 exit and 20 into a 14×14 one, e.g. [20] for 7×7 → 14×14).
        """
        count = len(patch_sizes) if patch_sizes is not None else len(exit_kwargs or ())
        patch_sizes = [None] * count if patch_sizes is None else list(patch_sizes)
        paddings = [0] * count if paddings is None else list(paddings)
        exit_kwargs = [{}] * count if exit_kwargs is None else list(exit_kwargs)
        upsample = [None] * (count - 1) if reuse_upsample is None else list(reuse_upsample)
        if count < 2 or not len(paddings) == len(exit_kwargs) == count or len(upsample) != count - 1:
            raise ValueError(
                f"DVT needs at least two exits, given by patch_sizes or exit_kwargs, with one padding and "
                f"one exit_kwargs entry per exit and one reuse_upsample per exit after the first; got "
                f"patch_sizes={patch_sizes}, paddings={paddings}, exit_kwargs={exit_kwargs}, "
                f"reuse_upsample={reuse_upsample}.")
        exits: list[DVTExit] = []
        for k, (patch, pad, kwargs) in enumerate(zip(patch_sizes, paddings, exit_kwargs)):
            vit = build_tokenized_vit(spec, num_classes, img_size, patch, pad, kwargs)
            upstream = exits[-1].grid if exits else None
            exits.append(DVTExit(vit, upstream, feature_reuse, relation_reuse, reuse_hidden, reuse_dim,
                                 upsample[k - 1] if k else None))
        grids = [e.grid for e in exits]
        if grids != sorted(set(grids)):
            raise ValueError(f"DVT's exits must have growing token grids, got {grids} from "
                             f"patch_sizes={patch_sizes}, paddings={paddings}, exit_kwargs={exit_kwargs}.")
        baseline = dict(spec=spec.with_(drop_path_rate=0.0), num_classes=num_classes, img_size=img_size,
                        patch_size=patch_sizes[-1], padding=paddings[-1], exit_kwargs=exit_kwargs[-1])
        return cls(exits, baseline)

    @classmethod
    def from_name(cls, backbone: str = "deit_small_patch16_224", num_classes: int = 1000,
                  pretrained: bool | str = False, drop_path_rate: float = 0.0, fused_attn: bool | None = None,
                  img_size: int = 224, patch_sizes: Sequence[int] | None = (32, 23, 16),
                  paddings: Sequence[int] | None = (0, 3, 0), feature_reuse: bool = True,
                  relation_reuse: bool = True, reuse_hidden: int = 128, reuse_dim: int = 48,
                  exit_kwargs: Sequence[dict[str, Any]] | None = None, reuse_upsample: Sequence[int] | None = None,
                  **vit_kwargs: Any) -> DVT:
        """`from_spec` on a backbone name (tests, scripts); `vit_kwargs` are the family's
        (embed_dim, depth, num_heads...)."""
        spec = BackboneSpec(name=backbone, pretrained=pretrained, drop_path_rate=drop_path_rate,
                            fused_attn=fused_attn, kwargs=vit_kwargs)
        return cls.from_spec(spec, num_classes, img_size, patch_sizes, paddings, feature_reuse, relation_reuse,
                             reuse_hidden, reuse_dim, exit_kwargs, reuse_upsample)

    # ------------------------------------------------------------------ forwards

    def _hands_logits(self, k: int) -> bool:
        return k + 1 < self.num_exits and self.exits[k + 1].relation_reuse is not None

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits on every image: [(B, classes)] * K."""
        outputs, handoff = [], None
        for k, exit_ in enumerate(self.exits):
            logits, handoff = exit_(x, handoff, hand_logits=self._hands_logits(k))
            outputs.append(logits)
        return outputs

    def forward_train(self, x: Tensor) -> list[Tensor]:
        return self.forward_exits(x)

    def forward_adaptive(self, x: Tensor, thresholds: Sequence[float]) -> AdaptiveOutput:
        """Real early exit: each exit runs only on the images still running.

        Args:
            x: (B, C, H, W) images.
            thresholds: K−1 max-softmax thresholds; an image answers at the first exit k < K−1
                whose confidence is >= thresholds[k], else at the last exit.
        """
        if len(thresholds) != self.num_exits - 1:
            raise ValueError(f"DVT with exits {self.exit_names} takes {self.num_exits - 1} thresholds, "
                             f"got {list(thresholds)}.")
        costs = self.exit_gflops()
        batch = x.shape[0]
        running = torch.arange(batch, device=x.device)  # indices into the batch
        exit_index = torch.full((batch,), self.num_exits - 1, dtype=torch.long, device=x.device)
        answers: Tensor | None = None
        handoff = None
        for k, exit_ in enumerate(self.exits):
            logits, handoff = exit_(x, handoff, hand_logits=self._hands_logits(k))
            if answers is None:
                answers = logits.new_empty(batch, logits.shape[-1])
            if k == self.num_exits - 1:
                answers[running] = logits
                break
            stop = logits.softmax(-1).amax(-1) >= thresholds[k]  # (b,)
            answers[running[stop]] = logits[stop]
            exit_index[running[stop]] = k
            keep = ~stop
            if not keep.any():
                break
            if not keep.all():  # (indexing copies: 188 MB of DeiT-S logits at batch 64)
                running, x, handoff = running[keep], x[keep], handoff.select(keep)
        gflops = torch.tensor(costs, dtype=torch.float32, device=x.device)[exit_index]
        return AdaptiveOutput(answers, exit_index, gflops)

    # ------------------------------------------------------------------ costs and baseline

    def exit_gflops(self) -> list[float]:
        """Cumulative GFLOPs per exit, reuse modules included (charged to the exit that runs them)."""
        return list(itertools.accumulate(e.gflops() for e in self.exits))

    def static_gflops(self) -> float:
        """The plain backbone at the last exit's grid (DeiT-S 14×14: 4.608)."""
        last = self.exits[-1]
        return last.family.gflops(last.vit)

    def static_baseline(self) -> nn.Module:
        return build_tokenized_vit(**self.baseline)

    def input_size(self) -> tuple[int, int, int]:
        first = self.exits[0]
        return first.family.input_size(first.vit)

    def benchmark_modes(self, x: Tensor) -> Iterator[tuple[str, Callable[[], AdaptiveOutput]]]:
        """Fractions of images past exit 1 (to the last exit), then, for 3+ exits, splits of the
        batch over all exits (e.g. 50/30/20 % answering at exits 1/2/3)."""
        yield from super().benchmark_modes(x)
        if self.num_exits < 3:
            return
        confidences = [logits.softmax(-1).amax(-1) for logits in self.forward_exits(x)[:-1]]
        even = (1 / self.num_exits,) * self.num_exits
        steep = tuple(2 ** -(k + 1) for k in range(self.num_exits - 1)) + (2 ** -(self.num_exits - 1),)
        for shares in (even, steep):
            thresholds = split_thresholds(confidences, shares)
            label = "answers " + "/".join(f"{s:.0%}" for s in shares)
            yield label, lambda t=thresholds: self.forward_adaptive(x, t)


def split_thresholds(confidences: Sequence[Tensor], shares: Sequence[float]) -> list[float]:
    """Thresholds under which about `shares[k]` of the images answer at exit k.

    Args:
        confidences: max softmax per image at exits 0..K−2, each (B,).
        shares: fraction of images answering at each of the K exits (sums to 1).
    """
    running = torch.ones_like(confidences[0], dtype=torch.bool)
    thresholds = []
    for k, confidence in enumerate(confidences):
        left = sum(shares[k:])
        onward = sum(shares[k + 1:]) / left if left > 0 else 0.0
        threshold = fraction_threshold(confidence[running], onward) if running.any() else math.inf
        thresholds.append(threshold)
        running &= confidence < threshold
    return thresholds
