"""CF-ViT: a coarse pass on a half-size image, then a fine pass that re-splits only the
informative patches, both through one shared ViT (docs/methods.md, "CF-ViT").

Shapes: B images, C channels, g the coarse grid (Nc = g² coarse patches), p the patch side,
D width, k = ⌈α·Nc⌉ informative patches, Nf = 4k + (Nc − k) fine-stage patch tokens.

- Coarse stage: the image resized to half its side (bilinear, ``align_corners=True``, no
  antialiasing, as the authors' weights expect), the shared patch embedding (Nc tokens), the
  coarse position embedding, all blocks, norm, head → p_c. From block ``cls_attn_start`` on the
  global class attention G ← β·G + (1−β)·a (a = the cls row of the attention, averaged over
  heads, over patch keys; G starts at 0) is computed on the side of each block (``tap="cls"``),
  so the blocks keep the fused attention kernel.
- Fine stage: the top-k coarse patches by G are replaced by their 2×2 fine patches, embedded
  from the full-resolution image (only those 4k patches are embedded) + the fine position
  embedding + the feature-reuse term R = MLP(LN(z_c)) of their coarse output token (z_c after the
  final norm; nearest ×2 upsampling = the same R for the four fine patches of a region). The
  other Nc − k patches keep their coarse token (coarse embedding + coarse position embedding, no
  reuse). The cls token takes the fine position embedding's first entry. Same blocks, norm, head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from adaptive_vit.backbones import BackboneFamily, combine_heads, create_vit, family_of
from adaptive_vit.flops import block_flops, mlp_flops, norm_flops
from adaptive_vit.methods.network import AdaptiveNetwork, AdaptiveOutput

# fvcore counts 4 FLOPs per output element of a bilinear resize (aten::upsample_bilinear2d).
BILINEAR_FLOPS_PER_ELEMENT = 4


class CoarseOutput(NamedTuple):
    """What the fine stage needs from the coarse stage (all indexed by image)."""

    logits: Tensor  # (B, classes) p_c before softmax
    features: Tensor  # (B, Nc, D) patch tokens after the final norm: the feature-reuse input
    embedding: Tensor  # (B, Nc, D) coarse patch embedding + coarse position embedding
    attention: Tensor | None  # (B, Nc) global class attention G (None when not tracked)
    class_logits: Tensor | None = None  # (B, classes) the class head alone (= logits without a token head)

    def index(self, rows: Tensor) -> CoarseOutput:
        return CoarseOutput(*(None if t is None else t[rows] for t in self))


class TrainOutput(NamedTuple):
    """What the training loss needs: both stages' predictions (p_c, p_f) and, for token labeling,
    the class heads alone and the fine stage's token head on the fine grid."""

    coarse: Tensor  # (B, classes) p_c
    fine: Tensor  # (B, classes) p_f
    coarse_class: Tensor  # (B, classes) the class head of the coarse stage (= p_c without a token head)
    fine_class: Tensor  # (B, classes) the class head of the fine stage (= p_f without a token head)
    fine_dense: Tensor | None  # (B, (2g)², classes) the token head on the fine grid (None without one)


def num_informative(alpha: float, coarse_patches: int) -> int:
    """k = ⌈α·Nc⌉ (rounded first so that e.g. 0.3·10 = 3.0000000000000004 gives 3)."""
    return math.ceil(round(alpha * coarse_patches, 9))


def num_fine_tokens(alpha: float, coarse_patches: int) -> int:
    """Nf = 4⌈α·Nc⌉ + ⌊(1−α)·Nc⌋ patch tokens in the fine stage (124 for g=7, α=0.5)."""
    k = num_informative(alpha, coarse_patches)
    return 4 * k + (coarse_patches - k)


class CFViT(AdaptiveNetwork):
    """Coarse-to-fine ViT over one shared backbone.

    The timm model runs at full resolution (fine grid 2g×2g); its ``pos_embed`` is the fine
    position embedding, and run on its own it is exactly the static backbone.

    Args:
        vit: a backbone (`adaptive_vit.backbones`) with a cls token and token pooling whose
            patch grid is square and even (2g×2g), and blocks that can tap the cls row.
        alpha: informative ratio α in (0, 1]: k = ⌈α·Nc⌉ patches are re-split.
        beta: EMA factor β of the global class attention.
        cls_attn_start: first block (0-based) whose class attention enters G.
        dense_weight: for a backbone with a token-labeling head (LV-ViT), the weight w of the
            token head's maximum in each stage's prediction: coarse (cls + w·max)/(1 + w), fine
            cls + w·max, the authors' (`cf_lvvit_small`: w = 0.25, the coarse sum divided by 1.25,
            the fine one not). Unused for backbones without one.
    """

    exit_names = ("coarse", "fine")

    def __init__(self, vit: nn.Module, alpha: float = 0.5, beta: float = 0.99,
                 cls_attn_start: int = 3, dense_weight: float = 0.25) -> None:
        super().__init__()
        self.family = family = family_of(vit)
        _check_backbone(vit, family)
        dims = family.dims(vit).as_dict()
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha (the informative ratio) must be in (0, 1], got {alpha}.")
        if not 0 <= cls_attn_start < dims["depth"]:
            raise ValueError(
                f"cls_attn_start={cls_attn_start} must index one of the {dims['depth']} blocks "
                f"(0..{dims['depth'] - 1}); the paper starts at 3 of 12."
            )
        self.vit = vit
        self.coarse_grid = family.dims(vit).grid[0] // 2
        self.alpha, self.beta, self.cls_attn_start = alpha, beta, cls_attn_start
        self.dense_weight = dense_weight
        dim = dims["dim"]
        # Start from the fine embedding resampled to the coarse grid (meaningful for pretrained
        # backbones; for a fresh backbone it is as random as the fine one).
        self.coarse_pos_embed = nn.Parameter(resample_abs_pos_embed(
            family.pos_embed(vit).detach(), (self.coarse_grid, self.coarse_grid), num_prefix_tokens=1
        ))
        self.reuse = nn.Sequential(
            nn.LayerNorm(dim, eps=family.norm(vit).eps),
            Mlp(dim, dims["mlp_hidden"], dim, act_layer=nn.GELU),
        )
        self.reuse.apply(init_weights_vit_timm)  # truncated normal 0.02, zero biases (as the authors)
        # Training forward: split every patch (True) or only the informative ones (False).
        # The LitModule switches it at the configured epoch; inference always selects.
        self.train_split_all = False

    @classmethod
    def from_name(cls, name: str, alpha: float = 0.5, beta: float = 0.99, cls_attn_start: int = 3,
                  **vit_kwargs: Any) -> CFViT:
        """Build on the timm ViT `create_vit(name, **vit_kwargs)` (tests, scripts; img_size is the
        full, fine resolution)."""
        return cls(create_vit(name, **vit_kwargs), alpha=alpha, beta=beta, cls_attn_start=cls_attn_start)

    # ------------------------------------------------------------------ sizes

    @property
    def num_coarse(self) -> int:
        return self.coarse_grid ** 2

    @property
    def num_informative(self) -> int:
        return num_informative(self.alpha, self.num_coarse)

    @property
    def num_fine(self) -> int:
        return num_fine_tokens(self.alpha, self.num_coarse)

    def input_size(self) -> tuple[int, int, int]:
        return self.family.input_size(self.vit)

    # ------------------------------------------------------------------ stages

    def coarse_stage(self, x: Tensor, track_attention: bool = True) -> CoarseOutput:
        """Half-size image → Nc tokens → blocks → p_c, and G if `track_attention`.

        Args:
            x: (B, C, H, W) full-resolution (normalised) images.
            track_attention: compute the global class attention (needed for selection).
        """
        if tuple(x.shape[-3:]) != self.input_size():
            raise ValueError(
                f"CF-ViT is configured for {self.input_size()} images, got {tuple(x.shape[-3:])}: "
                "make the data's img_size equal the model's (the full, fine resolution)."
            )
        half = (x.shape[-2] // 2, x.shape[-1] // 2)
        small = F.interpolate(x, size=half, mode="bilinear", align_corners=True, antialias=False)
        embedding = self.family.tokenize(self.vit, small) + self.coarse_pos_embed[:, 1:]  # (B, Nc, D)
        cls = (self.family.cls_token(self.vit) + self.coarse_pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        tokens, attention = self._encode(torch.cat([cls, embedding], 1), track_attention)
        class_logits = self.family.head(self.vit, tokens)
        logits = self._predict(class_logits, self.family.dense_head(self.vit, tokens), 1 + self.dense_weight)
        return CoarseOutput(logits, tokens[:, 1:], embedding, attention, class_logits)

    def fine_stage(self, x: Tensor, coarse: CoarseOutput, split_all: bool = False) -> Tensor:
        """Re-split the informative (or, with `split_all`, every) patch → p_f (B, classes).

        Args:
            x: (B, C, H, W) full-resolution images (the same rows as `coarse`).
            coarse: the coarse stage's output for these images.
            split_all: re-split all Nc patches (first training phase) instead of the top-k.
        """
        return self._predict(*self._fine_heads(x, coarse, split_all)[:2], 1.0)

    def _fine_heads(self, x: Tensor, coarse: CoarseOutput, split_all: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """The fine stage's class logits (B, classes), token-head logits in token order
        (B, Nf, classes) or None, and the re-split (B, k) and kept (B, Nc−k) regions."""
        informative, rest = self.select(coarse, split_all)  # (B, k), (B, Nc-k)
        B, k = informative.shape
        fine = self._embed_fine(x, informative)  # (B, k, 4, D)
        reuse = self.reuse(_gather(coarse.features, informative))  # (B, k, D)
        fine = (fine + reuse[:, :, None]).flatten(1, 2)  # (B, 4k, D)
        cls = (self.family.cls_token(self.vit) + self.family.pos_embed(self.vit)[:, :1]).expand(B, -1, -1)
        # Token order after cls does not matter (no position-dependent op past the embeddings).
        tokens = torch.cat([cls, fine, _gather(coarse.embedding, rest)], 1)  # (B, 1+Nf, D)
        tokens, _ = self._encode(tokens, track_attention=False)
        return self.family.head(self.vit, tokens), self.family.dense_head(self.vit, tokens), informative, rest

    def _on_fine_grid(self, dense: Tensor, informative: Tensor, rest: Tensor) -> Tensor:
        """Token-head logits in the fine stage's token order (4 per re-split region, then one per
        kept region) → the fine grid (B, (2g)², classes), a kept region's logits on its four
        cells (as the authors map them back for the token-labeling loss)."""
        B, k, g = dense.shape[0], informative.shape[1], self.coarse_grid
        by_region = dense.new_empty(B, self.num_coarse, 4, dense.shape[-1])
        rows = torch.arange(B, device=dense.device)[:, None]
        by_region[rows, informative] = dense[:, :4 * k].unflatten(1, (k, 4))
        by_region[rows, rest] = dense[:, 4 * k:, None].expand(-1, -1, 4, -1)
        grid = by_region.view(B, g, g, 2, 2, -1).permute(0, 1, 3, 2, 4, 5)  # (B, g, 2, g, 2, classes)
        return grid.reshape(B, 4 * self.num_coarse, -1)

    def select(self, coarse: CoarseOutput, split_all: bool = False) -> tuple[Tensor, Tensor]:
        """Coarse patch indices to re-split (B, k) — the top-k by G — and to keep (B, Nc−k)."""
        B = coarse.features.shape[0]
        if split_all:
            everything = torch.arange(self.num_coarse, device=coarse.features.device).expand(B, -1)
            return everything, everything[:, :0]
        if coarse.attention is None:
            raise ValueError("informative selection needs the global class attention: run "
                             "coarse_stage(x, track_attention=True).")
        order = coarse.attention.argsort(dim=1, descending=True)  # (B, Nc)
        return order[:, :self.num_informative], order[:, self.num_informative:]

    def _embed_fine(self, x: Tensor, informative: Tensor) -> Tensor:
        """Embed only the 2×2 fine patches of the selected regions, with their position
        embedding: (B, k, 4, D), the four in row-major order within each region."""
        g, dim = self.coarse_grid, self.family.dims(self.vit).dim
        fine = self.family.tokenize_regions(self.vit, x, g, informative)  # (B, k, 4, D)
        pos = self.family.pos_embed(self.vit)[0, 1:].view(g, 2, g, 2, dim).permute(0, 2, 1, 3, 4)
        pos = pos.reshape(g * g, 4, dim)  # (Nc, 4, D): fine embedding by coarse region
        return fine + pos[informative]

    def _predict(self, class_logits: Tensor, dense: Tensor | None, scale: float) -> Tensor:
        """The stage's prediction: the class head's logits, and with a token-labeling head (LV-ViT)
        (cls + dense_weight·max over tokens) / scale."""
        return class_logits if dense is None else combine_heads(class_logits, dense, self.dense_weight, scale)

    def _encode(self, tokens: Tensor, track_attention: bool) -> tuple[Tensor, Tensor | None]:
        """Blocks + final norm on (B, N, D) tokens; the EMA of the cls row from `cls_attn_start`."""
        x = self.family.pre_blocks(self.vit, tokens)
        attention = None
        for index, block in enumerate(self.family.blocks(self.vit)):
            if not track_attention or index < self.cls_attn_start:
                x = block(x)
                continue
            x, cls_row = block(x, tap="cls")  # cls_row (B, heads, N-1), post-softmax
            a = cls_row.detach().float().mean(1)  # (B, N-1)
            attention = (1 - self.beta) * a if attention is None else self.beta * attention + (1 - self.beta) * a
        return self.family.norm(self.vit)(x), attention

    # ------------------------------------------------------------------ the contract

    def forward_train(self, x: Tensor) -> TrainOutput:
        """Both stages for every image; the fine stage as `train_split_all` says."""
        coarse = self.coarse_stage(x, track_attention=not self.train_split_all)
        fine_class, dense, informative, rest = self._fine_heads(x, coarse, self.train_split_all)
        fine = self._predict(fine_class, dense, 1.0)
        fine_dense = None if dense is None else self._on_fine_grid(dense, informative, rest)
        return TrainOutput(coarse.logits, fine, coarse.class_logits, fine_class, fine_dense)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        coarse = self.coarse_stage(x)
        return [coarse.logits, self.fine_stage(x, coarse)]

    def forward_adaptive(self, x: Tensor, thresholds: Sequence[float]) -> AdaptiveOutput:
        """Coarse stage for all; the fine stage only for the images with max p_c < η."""
        coarse = self.coarse_stage(x)
        confidence = coarse.logits.softmax(-1).amax(-1)  # (B,)
        go_on = confidence < thresholds[0]
        logits = coarse.logits.clone()
        rows = go_on.nonzero().squeeze(1)  # (B',)
        if rows.numel():
            fine = self.fine_stage(x[rows], coarse.index(rows))
            logits[rows] = fine.to(logits.dtype)
        exit_index = go_on.long()
        costs = torch.tensor(self.exit_gflops(), dtype=torch.float32, device=x.device)
        return AdaptiveOutput(logits, exit_index, costs[exit_index])

    def decision_maps(self, x: Tensor) -> dict[str, Tensor]:
        """``regions`` (B, g, g) bool: the coarse patches re-split into 2×2 fine patches, as
        `forward_adaptive` decides at the current thresholds (the top-k by global class
        attention for images with max p_c < η; none for images answered by the coarse stage)."""
        coarse = self.coarse_stage(x)
        go_on = coarse.logits.softmax(-1).amax(-1) < self.exit_thresholds.tolist()[0]  # (B,)
        informative, _ = self.select(coarse)  # (B, k)
        regions = torch.zeros(x.shape[0], self.num_coarse, dtype=torch.bool, device=x.device)
        regions.scatter_(1, informative, True)
        regions &= go_on[:, None]
        return {"regions": regions.view(-1, self.coarse_grid, self.coarse_grid)}

    # ------------------------------------------------------------------ costs

    def exit_gflops(self) -> list[float]:
        """[coarse, coarse + fine] GFLOPs per image, analytic (equal to fvcore's count).

        Coarse: resize, tokenizer on the half-size image, blocks on 1+Nc tokens, norm, heads.
        Fine: the tokens of the k re-split regions (a patch embedding: of their 4k patches only;
        LV-ViT's stem: its convolutions on the whole image, its projection on the 4k patches),
        the reuse LN + MLP on their k coarse tokens, blocks on 1+Nf tokens, norm, heads (a
        token-labeling head runs on every patch token; the max over tokens counts 0). The side-computed cls row (one query per
        head, ~0.02 % of a block on the fused path, free on the explicit one) is not counted.
        """
        d = self.family.dims(self.vit).as_dict()
        dim, channels = d["dim"], d["in_chans"]
        k = self.num_informative

        def encoder(tokens: int) -> float:  # blocks, final norm, heads on 1+tokens
            blocks = d["depth"] * block_flops(1 + tokens, dim, d["num_heads"], d["mlp_hidden"])
            return blocks + norm_flops(1 + tokens, dim) + self.family.head_flops(self.vit, 1 + tokens)

        _, height, width = self.input_size()
        half = (height // 2, width // 2)
        coarse = (BILINEAR_FLOPS_PER_ELEMENT * channels * half[0] * half[1]
                  + self.family.tokenize_flops(self.vit, *half) + encoder(self.num_coarse))
        fine = (self.family.tokenize_regions_flops(self.vit, height, width, self.coarse_grid, k)
                + norm_flops(k, dim) + mlp_flops(k, dim, d["mlp_hidden"])
                + encoder(self.num_fine))
        return [coarse / 1e9, (coarse + fine) / 1e9]

    def static_gflops(self) -> float:
        """The plain backbone at full resolution (DeiT-S: 4.608)."""
        return self.family.gflops(self.vit)

    def static_baseline(self) -> nn.Module:
        """The shared timm ViT itself: run alone it is the plain backbone at full resolution."""
        return self.vit


def _gather(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens (B, N, D), index (B, n) → (B, n, D)."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def _check_backbone(vit: nn.Module, family: BackboneFamily) -> None:
    dims = family.dims(vit)
    grid = dims.grid
    if dims.num_prefix_tokens != 1 or getattr(vit, "global_pool", "token") != "token":
        raise ValueError(
            "CF-ViT needs a ViT with one cls token and token pooling (class attention ranks the "
            f"patches), got num_prefix_tokens={dims.num_prefix_tokens}, "
            f"global_pool={getattr(vit, 'global_pool', None)!r}. "
            "Use a DeiT/ViT backbone such as deit_small_patch16_224."
        )
    if grid[0] != grid[1] or grid[0] % 2:
        raise ValueError(
            f"CF-ViT needs a square, even fine patch grid (2g×2g), got {grid}: set img_size to "
            "2·g·patch_size (e.g. 224 for g=7 with 16-pixel patches, 288 for g=9)."
        )
    if getattr(vit, "no_embed_class", False) or family.pos_embed(vit) is None:
        raise ValueError("CF-ViT needs a learned position embedding that includes the cls token.")
