"""The LeViT family (Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for Faster
Inference", ICCV 2021): timm's `levit_*` models, the backbones of MIA-Former's Table 1 (LeViT-192,
LeViT-256). docs/levit.md.

timm's model is used as it is (its modules, its weights' layout, its forward):

- a stem of four 3×3 stride-2 convolutions with BatchNorm and Hardswish (16 pixels per token;
  ``patch_size: 8``, or ``kwargs: {stem_type: s8}``, takes three, 8 pixels);
- three stages of residual blocks (`LevitBlock`: attention, then an MLP, each a residual branch)
  at 14×14, 7×7 and 4×4 tokens on a 224 image, widths (192, 288, 384) for LeViT-192 and
  (256, 384, 512) for LeViT-256; between two stages an attention-subsample block
  (`LevitDownsample`: queries on every other token, then an MLP) changes the grid and the width;
- no class token and no position embedding: the attention carries a learned bias per head and
  relative position (``attention_biases`` indexed by ``attention_bias_idxs``); q and k have
  ``key_dim`` channels per head, v ``attn_ratio``·``key_dim``;
- every linear layer is a `LinearNorm` (Linear without bias, then BatchNorm over the tokens);
- the head averages the tokens and applies two BatchNorm + Linear classifiers (class and
  distillation) whose outputs are averaged (timm's `LevitDistilled`).

Of timm's two forms, ``levit_*`` (Linear + BatchNorm1d on (B, N, C) rows) is the one wrapped here;
``levit_conv_*`` (1×1 convolutions on (B, C, H, W) maps) holds the same numbers. Rows are what a
method that drops tokens needs: gathering the kept tokens of each image is an index on the token
axis, a map has no room for holes.

FLOPs (`LeViTFamily.gflops`) follow the project's convention, as fvcore counts timm's model: the
convolutions' and linears' multiply-adds, 2 per element for an eval-mode BatchNorm (affine), both
attention matmuls (q·kᵀ with ``key_dim``, attn·v with the value width); Hardswish, softmax, the
bias add, the subsampling, the token mean and additions count 0.
"""

from __future__ import annotations

from timm.models.levit import Attention, Levit, LevitBlock, LevitDownsample, NormLinear
from torch import Tensor, nn

from adaptive_vit.backbones.spec import BackboneDims, BackboneFamily, BackboneSpec, BackboneStage
from adaptive_vit.backbones.timm_vit import create_timm_model

BN_FLOPS_PER_ELEMENT = 2  # fvcore: an eval-mode BatchNorm with affine weights
STEMS = {16: "s16", 8: "s8"}  # pixels per token → timm's stem_type

Number = float | Tensor

_NO_NORM = nn.Identity()  # LeViT has no final norm: its head normalises the pooled features


def linear_norm_flops(tokens: Number, in_features: Number, out_features: Number) -> Number:
    """A `LinearNorm` (Linear without bias, BatchNorm) on `tokens` rows."""
    return tokens * out_features * (in_features + BN_FLOPS_PER_ELEMENT)


def attention_flops(attn: Attention, tokens: Number, heads: Number | None = None) -> Number:
    """A LeViT `Attention` on `tokens` tokens with `heads` of its heads (None: all): qkv, q·kᵀ
    (key_dim per head), attn·v (val_dim per head), proj (Hardswish, then a LinearNorm writing every
    channel)."""
    h = attn.num_heads if heads is None else heads
    dim = attn.qkv.linear.in_features
    per_head = 2 * attn.key_dim + attn.val_dim
    return (linear_norm_flops(tokens, dim, h * per_head)
            + tokens * tokens * h * (attn.key_dim + attn.val_dim)
            + linear_norm_flops(tokens, h * attn.val_dim, dim))


def mlp_flops(tokens: Number, channels: Number, hidden: Number) -> Number:
    """A `LevitMlp` reading and writing `channels` channels through `hidden` hidden units."""
    return linear_norm_flops(tokens, channels, hidden) + linear_norm_flops(tokens, hidden, channels)


def block_flops(block: LevitBlock, tokens: int) -> float:
    """One `LevitBlock` (attention and MLP residuals) on `tokens` tokens."""
    mlp = block.mlp.ln1.linear
    return attention_flops(block.attn, tokens) + mlp_flops(tokens, mlp.in_features, mlp.out_features)


def downsample_flops(down: LevitDownsample) -> float:
    """The attention-subsample block between two stages: k and v on every token, q on every
    `stride`-th row and column, the proj and the MLP on the queries' tokens."""
    attn = down.attn_downsample
    keys = attn.resolution[0] * attn.resolution[1]
    queries = attn.attention_bias_idxs.shape[0]
    dim, out = attn.kv.linear.in_features, attn.proj.ln.linear.out_features
    mlp = down.mlp.ln1.linear
    return (linear_norm_flops(keys, dim, attn.num_heads * (attn.key_dim + attn.val_dim))
            + linear_norm_flops(queries, dim, attn.num_heads * attn.key_dim)
            + queries * keys * attn.num_heads * (attn.key_dim + attn.val_dim)
            + linear_norm_flops(queries, attn.val_attn_dim, out)
            + mlp_flops(queries, mlp.in_features, mlp.out_features))


def stem_flops(model: Levit, side: int) -> float:
    """The convolutional stem on a side×side image (each a conv + BatchNorm)."""
    total = 0.0
    for module in model.stem.children():
        conv = getattr(module, "linear", None)
        if isinstance(conv, nn.Conv2d):
            side = (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
            per_pixel = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
            total += side * side * conv.out_channels * (per_pixel + BN_FLOPS_PER_ELEMENT)
    return total


def head_flops(model: Levit) -> float:
    """Token mean (0), then each classifier: BatchNorm on the pooled features and a Linear."""
    heads = [m for m in (model.head, getattr(model, "head_dist", None)) if isinstance(m, NormLinear)]
    return sum(BN_FLOPS_PER_ELEMENT * m.linear.in_features + m.linear.in_features * m.linear.out_features
               for m in heads)


class LeViTFamily(BackboneFamily):
    """timm's LeViTs in their Linear + BatchNorm form: ``levit_128s``, ``levit_128``, ``levit_192``,
    ``levit_256``, ``levit_384`` (any size through ``kwargs``: embed_dim, key_dim, num_heads,
    depth, attn_ratio, mlp_ratio, stem_type). They run as static models and under MIA-Former;
    CF-ViT and DVT need a class token and position embeddings, which LeViT has not."""

    name = "levit"
    model_class = Levit

    def handles(self, name: str) -> bool:
        return name.startswith("levit_")

    def default_patch_size(self, name: str) -> int | None:
        return 16

    def create(self, spec: BackboneSpec, num_classes: int) -> Levit:
        if "_conv" in spec.name:
            raise ValueError(
                f"{spec.name!r} is timm's convolutional LeViT (1×1 convolutions on maps); this tool wraps "
                f"the Linear + BatchNorm form with the same numbers: use {spec.name.replace('_conv', '')!r}."
            )
        if spec.fused_attn is not None:
            raise ValueError("LeViT's attention adds a position bias and has one kernel: leave backbone.fused_attn unset.")
        kwargs = dict(num_classes=num_classes, drop_path_rate=spec.drop_path_rate, **spec.kwargs)
        if spec.patch_size is not None:  # the stem's stride: four stride-2 convolutions (16) or three (8)
            stem = STEMS.get(spec.patch_size)
            if stem is None or kwargs.setdefault("stem_type", stem) != stem:
                raise ValueError(
                    f"LeViT's convolutional stem makes tokens of 16 pixels (stem_type s16) or 8 (s8): backbone."
                    f"patch_size {spec.patch_size} with kwargs stem_type {kwargs.get('stem_type')!r} is neither; "
                    "set patch_size to 16 or 8, or leave it unset."
                )
        if spec.img_size is not None:
            kwargs["img_size"] = spec.img_size
        model = create_timm_model(spec.name, spec.pretrained, "head.linear.weight", **kwargs)
        if not isinstance(model, Levit) or model.use_conv:
            raise ValueError(f"{spec.name!r} is not a LeViT in the Linear + BatchNorm form (levit_192, levit_256, ...).")
        return model

    def dims(self, model: Levit) -> BackboneDims:
        """The first stage's width, heads, MLP and grid, and all blocks (`stages` has each stage's)."""
        first = self.stages(model)[0]
        return BackboneDims(
            dim=first.dim, depth=sum(len(s.blocks) for s in model.stages), num_heads=first.num_heads,
            mlp_hidden=first.blocks[0].mlp.ln1.linear.out_features, grid=first.grid, num_prefix_tokens=0,
            patch_size=model.stem.stride, in_chans=model.in_chans, num_classes=model.num_classes,
        )

    def stages(self, model: Levit) -> list[BackboneStage]:
        stages = []
        for stage in model.stages:
            attn = stage.blocks[0].attn
            entry = None if isinstance(stage.downsample, nn.Identity) else stage.downsample
            stages.append(BackboneStage(entry, stage.blocks, attn.qkv.linear.in_features, attn.num_heads,
                                        tuple(attn.resolution), 0))
        return stages

    def embed(self, model: Levit, x: Tensor) -> Tensor:
        """Images → the first stage's tokens (B, N, D): the stem's map as rows."""
        return model.stem(x).flatten(2).transpose(1, 2)

    def norm(self, model: Levit) -> nn.Module:
        return _NO_NORM

    def head(self, model: Levit, tokens: Tensor) -> Tensor:
        """(B, N, D) → logits: the token mean, then the class and distillation heads averaged."""
        return model.forward_head(tokens)

    def gflops(self, model: Levit) -> float:
        total = stem_flops(model, self.input_size(model)[1]) + head_flops(model)
        for stage in model.stages:
            if isinstance(stage.downsample, LevitDownsample):
                total += downsample_flops(stage.downsample)
            for block in stage.blocks:
                resolution = block.attn.resolution
                total += block_flops(block, resolution[0] * resolution[1])
        return total / 1e9

    def input_size(self, model: Levit) -> tuple[int, int, int]:
        rows, cols = model.stages[0].blocks[0].attn.resolution
        return (model.in_chans, rows * model.stem.stride, cols * model.stem.stride)

    # A ViT's pieces LeViT has not: CF-ViT and DVT ask for them.

    def _refuse(self, what: str) -> None:
        raise ValueError(
            f"LeViT has no {what}: CF-ViT and DVT need a ViT with a class token and position embeddings. "
            "LeViT backbones run with StaticViTLitModule and MIALitModule."
        )

    def tokenize(self, model: Levit, x: Tensor) -> Tensor:
        self._refuse("patch tokenizer apart from its stages")

    def cls_token(self, model: Levit) -> Tensor:
        self._refuse("class token")

    def pos_embed(self, model: Levit) -> Tensor:
        self._refuse("position embedding")

    def pre_blocks(self, model: Levit, tokens: Tensor) -> Tensor:
        self._refuse("single stack of blocks")

    def blocks(self, model: Levit) -> nn.Sequential:
        self._refuse("single stack of blocks (its blocks come in stages with subsampling between them)")
