"""The T2T-ViT family (Yuan et al., ICCV 2021): Tokens-to-Token ViTs, the backbone of DVT's
headline results (docs/t2t.md).

A T2T-ViT is a plain pre-norm ViT whose tokenizer is the Tokens-to-Token module: three "soft
splits" (overlapping unfolds of the image, then of the token maps), with a token performer after
each of the first two (a one-head linear-attention layer of width 64 whose output re-forms a
map), and a linear projection of the last split to the width D. Then a class token, fixed
sinusoidal position embeddings, the blocks (this project's tap-able `Block`: timm's, with no qkv
bias and LayerNorm eps 1e-5 as the authors'), a final norm and a linear head on the class token.

The released T2T-ViT-12/14 (and the DVT authors' cascades) use the performer variant, whose
random-feature matrix `w` is drawn once (orthogonal rows scaled by √m) and kept fixed: it is a
buffer here, saved with the weights as in their checkpoints. Module names follow their
checkpoints' layout (``tokens_to_token.attention1.kqv``, ``...w``, ``blocks.{i}.attn.qkv``...), so
their tensors load without renaming.

The first soft split sets the token grid. ``soft_split: [kernel, stride, padding]`` (a spec
kwarg) chooses it: [7, 4, 2] gives 14×14 tokens on a 224 image (the released models), [11, 6, 5]
10×10 and [14, 8, 3] 7×7 (the DVT authors' ``performer_less_token`` and
``performer_less_less_token`` exits). The other two splits are 3×3, stride 2, padding 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from adaptive_vit.backbones.spec import BackboneDims, BackboneFamily, BackboneSpec
from adaptive_vit.backbones.timm_vit import Block, set_fused_attn
from adaptive_vit.flops import block_flops, norm_flops

# name → (width D, blocks L, heads H, MLP ratio), the T2T-ViT paper's Table 1 (performer variants)
T2T_VIT_SIZES = {
    "t2t_vit_7": (256, 7, 4, 2.0),
    "t2t_vit_10": (256, 10, 4, 2.0),
    "t2t_vit_12": (256, 12, 4, 2.0),
    "t2t_vit_14": (384, 14, 6, 3.0),
    "t2t_vit_19": (448, 19, 7, 3.0),
    "t2t_vit_24": (512, 24, 8, 3.0),
}
# the first soft split of the released models (14×14 tokens on 224); the two others are fixed
DEFAULT_SOFT_SPLIT = (7, 4, 2)
LATER_SOFT_SPLIT = (3, 2, 1)


def split_side(side: int, kernel: int, stride: int, padding: int) -> int:
    """Tokens per side after an unfold of a `side`-wide map."""
    return (side + 2 * padding - kernel) // stride + 1


def sinusoid_table(positions: int, dim: int) -> Tensor:
    """The Transformer's fixed position encoding: (1, positions, dim), channel 2i the sine and
    2i+1 the cosine of position / 10000^(2i/dim)."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    exponent = (torch.arange(dim) // 2 * 2).to(torch.float64) / dim
    angles = position / torch.pow(10000.0, exponent)
    table = torch.where(torch.arange(dim) % 2 == 0, angles.sin(), angles.cos())
    return table.to(torch.float32)[None]


class TokenPerformer(nn.Module):
    """One token performer: single-head attention with a positive random-feature kernel
    (FAVOR+), linear in the number of tokens, then an MLP; it narrows `dim` to `width`.

    y = v + proj(attn(LN(x))) with q, k, v of width `width` (v is the skip path, as the
    authors' layer: the input width differs), then y + MLP(LN(y)). The softmax kernel
    exp(q·k) is estimated with m = `kernel_ratio`·width features φ(x) = exp(w·x − |x|²/2)/√m.

    Args:
        dim: input token width (channels × kernel² of the soft split before it).
        width: q, k, v and output width (64 in T2T-ViT).
        kernel_ratio: random features per channel of q/k (0.5: m = 32).
        drop: dropout after the attention projection and the MLP (0.1, as the authors').
    """

    def __init__(self, dim: int, width: int = 64, kernel_ratio: float = 0.5, drop: float = 0.1) -> None:
        super().__init__()
        self.width = width
        self.features = int(width * kernel_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.kqv = nn.Linear(dim, 3 * width)  # k, q, v in that order (the checkpoints' layout)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.Dropout(drop))
        # fixed random features: orthogonal rows of norm √m (a buffer: saved, never trained)
        self.register_buffer("w", nn.init.orthogonal_(torch.empty(self.features, width)) * math.sqrt(self.features))
        self.epsilon = 1e-8  # keeps the normaliser away from zero

    def feature_map(self, x: Tensor) -> Tensor:
        """φ(x) = exp(w·x − |x|²/2) / √m: (B, T, width) → (B, T, m), in float32 (exp overflows
        in half precision)."""
        x = x.float()
        projected = x @ self.w.float().T
        return torch.exp(projected - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(self.features)

    def attend(self, x: Tensor) -> Tensor:
        """Linear attention on normed tokens (B, T, dim) → (B, T, width), v as the skip path."""
        k, q, v = self.kqv(x).split(self.width, dim=-1)
        kp, qp = self.feature_map(k), self.feature_map(q)  # (B, T, m)
        normaliser = qp @ kp.sum(dim=1)[..., None]  # (B, T, 1)
        context = v.float().transpose(1, 2) @ kp  # (B, width, m)
        y = (qp @ context.transpose(1, 2)) / (normaliser + self.epsilon)  # (B, T, width)
        return v + self.drop(self.proj(y.to(v.dtype)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def flops(self, tokens: int) -> float:
        """Multiply-adds on `tokens` tokens (the project's convention: norms 5 per element)."""
        dim, width, m = self.kqv.in_features, self.width, self.features
        return (norm_flops(tokens, dim) + tokens * dim * 3 * width  # norm1, kqv
                + 2 * tokens * width * m  # φ(k), φ(q)
                + tokens * m  # normaliser
                + 2 * tokens * width * m  # context, y
                + tokens * width * width  # proj
                + norm_flops(tokens, width) + 2 * tokens * width * width)  # norm2, MLP


class TokensToToken(nn.Module):
    """The Tokens-to-Token tokenizer: soft split, performer, re-form the map, soft split,
    performer, re-form, soft split, project to the width.

    Args:
        img_size: input side.
        in_chans: image channels.
        dim: output token width D.
        soft_split: (kernel, stride, padding) of the first unfold (it sets the grid).
        width: the performers' width (64).
    """

    def __init__(self, img_size: int, in_chans: int, dim: int, soft_split: Sequence[int] = DEFAULT_SOFT_SPLIT,
                 width: int = 64) -> None:
        super().__init__()
        kernel, stride, padding = soft_split
        later, later_stride, later_padding = LATER_SOFT_SPLIT
        self.splits = [tuple(soft_split), LATER_SOFT_SPLIT, LATER_SOFT_SPLIT]
        self.soft_split0 = nn.Unfold(kernel, stride=stride, padding=padding)
        self.soft_split1 = nn.Unfold(later, stride=later_stride, padding=later_padding)
        self.soft_split2 = nn.Unfold(later, stride=later_stride, padding=later_padding)
        self.attention1 = TokenPerformer(in_chans * kernel * kernel, width)
        self.attention2 = TokenPerformer(width * later * later, width)
        self.project = nn.Linear(width * later * later, dim)
        self.sides = [img_size]  # map side before each split, then the token grid
        for split in self.splits:
            self.sides.append(split_side(self.sides[-1], *split))
        if self.sides[-1] < 1:
            raise ValueError(f"soft split {list(soft_split)} leaves no tokens on a {img_size}-pixel image.")

    @property
    def grid(self) -> int:
        return self.sides[-1]

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, N, D)."""
        tokens = self.soft_split0(x).transpose(1, 2)  # (B, T0, C·k²)
        for performer, split in ((self.attention1, self.soft_split1), (self.attention2, self.soft_split2)):
            tokens = performer(tokens)  # (B, T, width)
            side = math.isqrt(tokens.shape[1])
            tokens = split(tokens.transpose(1, 2).unflatten(2, (side, side))).transpose(1, 2)
        return self.project(tokens)

    def flops(self) -> float:
        """Multiply-adds of one image (the unfolds move data only)."""
        t0, t1, t2 = (side * side for side in self.sides[1:])
        return (self.attention1.flops(t0) + self.attention2.flops(t1)
                + t2 * self.project.in_features * self.project.out_features)


class T2TViT(nn.Module):
    """A T2T-ViT: the Tokens-to-Token tokenizer, a class token, sinusoidal positions, pre-norm
    blocks, a final norm and a linear head on the class token.

    Args:
        img_size: input side (224).
        num_classes: classifier outputs.
        embed_dim: width D.
        depth: blocks L.
        num_heads: heads H.
        mlp_ratio: MLP hidden width / D.
        in_chans: image channels.
        soft_split: (kernel, stride, padding) of the first soft split.
        token_width: the performers' width (64).
        drop_rate: dropout on the positions and inside the blocks.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, growing linearly to this over the blocks.
    """

    def __init__(self, img_size: int = 224, num_classes: int = 1000, embed_dim: int = 256, depth: int = 12,
                 num_heads: int = 4, mlp_ratio: float = 2.0, in_chans: int = 3,
                 soft_split: Sequence[int] = DEFAULT_SOFT_SPLIT, token_width: int = 64, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.tokens_to_token = TokensToToken(img_size, in_chans, embed_dim, soft_split, token_width)
        grid = self.tokens_to_token.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(1 + grid * grid, embed_dim))  # fixed, saved
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # (no tensor: meta builds)
        self.blocks = nn.Sequential(*(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rate, norm_layer=nn.LayerNorm)
            for rate in rates))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        # The authors' initialisation: truncated-normal (0.02) linears with zero bias; norms
        # keep their construction values (ones, zeros).
        self.apply(partial(init_weights_vit_timm, needs_reset=False))

    @property
    def grid(self) -> int:
        return self.tokens_to_token.grid

    def embed(self, x: Tensor) -> Tensor:
        """Images → the first block's input (B, 1 + N, D)."""
        tokens = self.tokens_to_token(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(tokens + self.pos_embed)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.embed(x)))[:, 0])

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}


def create_t2t_vit(spec: BackboneSpec, num_classes: int) -> T2TViT:
    """The T2T-ViT of `spec`: ``t2t_vit_12``, ``t2t_vit_14``... (`T2T_VIT_SIZES`).

    Args:
        spec: its name, img_size (224 if unset), drop_path_rate, fused_attn and kwargs (any
            `T2TViT` argument: ``soft_split``, or ``embed_dim``/``depth``/``num_heads``/``mlp_ratio``
            to override the size).
        num_classes: classifier outputs.
    """
    if spec.name not in T2T_VIT_SIZES:
        raise ValueError(f"unknown T2T-ViT {spec.name!r}: the family builds {sorted(T2T_VIT_SIZES)}.")
    if spec.patch_size is not None:
        raise ValueError(
            f"{spec.name} has no patch size: its token grid comes from its first soft split. Set "
            "`backbone.patch_size: null` and give `backbone.kwargs: {soft_split: [kernel, stride, padding]}` "
            "([7, 4, 2]: 14x14 tokens on 224)."
        )
    if spec.pretrained:
        raise ValueError(
            f"{spec.name}: no pretrained T2T-ViT weights are loaded by this family. Start from an earlier "
            "run or the DVT authors' release with `init_from`."
        )
    dim, depth, heads, ratio = T2T_VIT_SIZES[spec.name]
    options = {**dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=ratio), **spec.kwargs}
    model = T2TViT(img_size=spec.img_size or 224, num_classes=num_classes, drop_path_rate=spec.drop_path_rate,
                   **options)
    set_fused_attn(model, spec.fused_attn)
    return model


class T2TViTFamily(BackboneFamily):
    """``t2t_vit_7|10|12|14|19|24``: `T2TViT`, the performer variants."""

    name = "t2t_vit"
    model_class = T2TViT

    def handles(self, name: str) -> bool:
        return name.startswith("t2t_vit")

    def create(self, spec: BackboneSpec, num_classes: int) -> T2TViT:
        return create_t2t_vit(spec, num_classes)

    def dims(self, model: T2TViT) -> BackboneDims:
        block = model.blocks[0]
        stride = math.prod(split[1] for split in model.tokens_to_token.splits)
        return BackboneDims(dim=model.cls_token.shape[-1], depth=len(model.blocks),
                            num_heads=block.attn.num_heads, mlp_hidden=block.mlp.fc1.out_features,
                            grid=(model.grid, model.grid), num_prefix_tokens=1, patch_size=stride,
                            in_chans=model.in_chans, num_classes=model.num_classes)

    def tokenize(self, model: T2TViT, x: Tensor) -> Tensor:
        return model.tokens_to_token(x)

    def gflops(self, model: T2TViT) -> float:
        d = self.dims(model)
        tokens = 1 + d.num_patches
        return (model.tokens_to_token.flops() + d.depth * block_flops(tokens, d.dim, d.num_heads, d.mlp_hidden)
                + norm_flops(tokens, d.dim) + d.dim * d.num_classes) / 1e9

    def input_size(self, model: T2TViT) -> tuple[int, int, int]:
        return (model.in_chans, model.img_size, model.img_size)
