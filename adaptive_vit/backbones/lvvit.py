"""The LV-ViT family (Jiang et al., "All Tokens Matter: Token Labeling for Training Better
Vision Transformers", NeurIPS 2021): `lvvit_s` and scaled-down variants for tests and demos.

What the TokenLabeling release (`tlt/models/lvvit.py`, `lvvit_s`) and the CF-ViT authors'
copy (`lvvit/models/lvvit.py`, `lvvit/models/layers.py`, `cf_lvvit_small`) build, and so this
module:

- a 4-layer convolutional patch embedding: conv 7×7 stride 2 (padding 3), conv 3×3, conv 3×3
  (padding 1), each without bias and followed by BatchNorm and ReLU, at 64 channels; then an
  (p/2)×(p/2) stride-(p/2) projection to the width D with bias (p = 16: 8×8 stride 8);
- a class token and one learned position embedding (1 + N), dropout;
- pre-norm blocks (LayerNorm eps 1e-5, qkv without bias, MLP ratio 3, GELU) whose two residual
  branches are divided by ``skip_lam`` (2 for LV-ViT-S);
- a final LayerNorm, the class head on the class token and the token-labeling head
  (``aux_head``) on every patch token. The static model answers cls + 0.5·max over tokens of the
  token head (their eval output); training forwards return the two heads' logits apart.

Parameter names are the authors' (``patch_embed.conv1``, ``bn1``, ..., ``aux_head``), so their
state_dicts load as they are. FLOPs (`LVViTFamily.gflops`) follow the project's convention: fvcore
counts the convolutions' multiply-adds (no bias), 2 FLOPs per element for an eval-mode affine
BatchNorm, 5 per element for a LayerNorm, both heads' matrix products (the token head on every
patch token), the attention matmuls; ReLU, GELU, softmax, the max over tokens, additions and the
``skip_lam`` division count 0.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch import Tensor, nn

from adaptive_vit.backbones.spec import (
    BackboneDims,
    BackboneFamily,
    BackboneSpec,
    TrainHeads,
    combine_heads,
    crop_regions,
)
from adaptive_vit.backbones.timm_vit import Block, set_fused_attn
from adaptive_vit.flops import block_flops, norm_flops

BN_FLOPS_PER_ELEMENT = 2  # fvcore: an eval-mode BatchNorm with affine weights

# name → architecture (the TokenLabeling release's `lvvit_s`; CF-ViT's `cf_lvvit_small`)
LVVIT_ARCHS: dict[str, dict[str, float]] = {
    "lvvit_s": dict(embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0),
}


class ResidualScale(nn.Module):
    """Multiplies a residual branch by a fixed factor (LV-ViT's 1/skip_lam); no parameters."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class LVBlock(Block):
    """The project's tap-able `Block` with both residual branches divided by `skip_lam`.

    timm's block computes x + drop_path(ls(branch)); ls is its LayerScale slot, which here holds a
    fixed 1/skip_lam (drop path scales per sample, so the order equals theirs,
    x + drop_path(branch)/skip_lam).

    Args:
        skip_lam: the residual divisor (LV-ViT-S: 2).
        *args, **kwargs: `Block`'s (dim, num_heads, mlp_ratio, qkv_bias, drop_path, ...).
    """

    def __init__(self, *args, skip_lam: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ls1 = ResidualScale(1.0 / skip_lam)
        self.ls2 = ResidualScale(1.0 / skip_lam)


class ConvStem(nn.Module):
    """LV-ViT's 4-layer patch embedding: three conv-BN-ReLU layers at half resolution
    (`features`), then a non-overlapping (p/2)×(p/2) projection to the width (`proj`).

    Args:
        patch_size: pixels per token side p (even).
        embed_dim: token width D.
        in_chans: image channels.
        width: channels of the three convolutions (64 in LV-ViT).
    """

    def __init__(self, patch_size: int = 16, embed_dim: int = 384, in_chans: int = 3, width: int = 64) -> None:
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"LV-ViT's stem halves the image first: patch_size must be even, got {patch_size}.")
        self.patch_size, self.in_chans, self.width = patch_size, in_chans, width
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, width, H/2, W/2): the three conv-BN-ReLU layers."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.relu(self.bn3(self.conv3(x)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, D, H/p, W/p)."""
        return self.proj(self.features(x))

    def features_flops(self, height: int, width: int) -> float:
        """Multiply-adds (and BatchNorms) of `features` on an H×W image."""
        pixels = (height // 2) * (width // 2)
        c = self.width
        convs = pixels * (self.in_chans * c * 49 + 2 * c * c * 9)
        return convs + 3 * BN_FLOPS_PER_ELEMENT * pixels * c

    def proj_flops(self, num_patches: int) -> float:
        """Multiply-adds of `proj` on `num_patches` tokens."""
        k = self.patch_size // 2
        return num_patches * self.width * k * k * self.proj.out_channels


class LVViT(nn.Module):
    """LV-ViT (see the module docstring).

    Args:
        img_size: input side (square).
        patch_size: pixels per token side (16).
        in_chans: image channels.
        num_classes: outputs of the class head and of the token head.
        embed_dim: token width D.
        depth: blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        skip_lam: residual divisor of every block.
        stem_width: channels of the convolutional stem (64).
        drop_rate: dropout after the position embedding, in the MLPs and after the attention proj.
        drop_path_rate: stochastic depth, growing linearly over the blocks.
        dense_weight: weight of the token head's maximum in the static prediction (0.5).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 16, num_heads: int = 6, mlp_ratio: float = 3.0,
                 skip_lam: float = 2.0, stem_width: int = 64, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, dense_weight: float = 0.5) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}.")
        self.img_size, self.num_classes, self.embed_dim = img_size, num_classes, embed_dim
        self.dense_weight = dense_weight
        self.grid = img_size // patch_size
        self.patch_embed = ConvStem(patch_size, embed_dim, in_chans, stem_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # linear, as timm
        self.blocks = nn.Sequential(*(
            LVBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, proj_drop=drop_rate,
                    drop_path=rate, norm_layer=nn.LayerNorm, skip_lam=skip_lam)
            for rate in rates
        ))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.aux_head = nn.Linear(embed_dim, num_classes)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        # The authors' initialisation: truncated-normal (0.02) linears with zero bias; norms
        # keep their construction values (ones, zeros).
        self.apply(partial(init_weights_vit_timm, needs_reset=False))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def tokenize(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, N, D)."""
        return self.patch_embed(x).flatten(2).transpose(1, 2)

    def embed(self, x: Tensor) -> Tensor:
        """Images → the first block's input (B, 1 + N, D): class token, tokens, positions."""
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.tokenize(x)], 1)
        return self.pos_drop(tokens + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images → tokens after the final norm (B, 1 + N, D)."""
        return self.norm(self.blocks(self.embed(x)))

    def forward_heads(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Normed tokens → class logits (B, classes) and token logits (B, N, classes)."""
        return self.head(tokens[:, 0]), self.aux_head(tokens[:, 1:])

    def forward_with_heads(self, x: Tensor) -> TrainHeads:
        """The prediction (as `forward`) and both heads apart, for token labeling."""
        class_logits, dense = self.forward_heads(self.forward_features(x))
        return TrainHeads(combine_heads(class_logits, dense, self.dense_weight), class_logits, dense)

    def forward(self, x: Tensor) -> Tensor:
        """Logits cls + dense_weight·max over tokens of the token head (B, classes)."""
        return self.forward_with_heads(x).logits


class LVViTFamily(BackboneFamily):
    """LV-ViT backbones: ``lvvit_s`` (and any size through ``kwargs``: embed_dim, depth,
    num_heads, mlp_ratio, skip_lam, stem_width, dense_weight)."""

    name = "lvvit"
    model_class = LVViT

    def handles(self, name: str) -> bool:
        return name in LVVIT_ARCHS

    def default_patch_size(self, name: str) -> int | None:
        return 16

    def create(self, spec: BackboneSpec, num_classes: int) -> LVViT:
        kwargs = {**LVVIT_ARCHS[spec.name], **spec.kwargs}
        model = LVViT(img_size=spec.img_size or 224, patch_size=spec.patch_size or 16, num_classes=num_classes,
                      drop_path_rate=spec.drop_path_rate, **kwargs)
        if spec.pretrained:
            load_lvvit_weights(model, spec.pretrained, spec.name)
        set_fused_attn(model, spec.fused_attn)
        return model

    def dims(self, model: LVViT) -> BackboneDims:
        block = model.blocks[0]
        return BackboneDims(
            dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
            mlp_hidden=block.mlp.fc1.out_features, grid=(model.grid, model.grid), num_prefix_tokens=1,
            patch_size=model.patch_embed.patch_size, in_chans=model.patch_embed.in_chans,
            num_classes=model.num_classes,
        )

    def tokenize(self, model: LVViT, x: Tensor) -> Tensor:
        return model.tokenize(x)

    def tokenize_regions(self, model: LVViT, x: Tensor, grid: int, regions: Tensor) -> Tensor:
        """The stem's convolutions see the whole image (their receptive field crosses region
        borders, so a crop's own stem output would differ at its edges); only the projection,
        which reads each patch alone, runs on the chosen regions. The CF-ViT authors run the
        whole stem, projection included, on the full image and pick tokens afterwards: the same
        tokens."""
        features = model.patch_embed.features(x)  # (B, width, H/2, W/2)
        crops = crop_regions(features, grid, regions)  # (B*k, width, side/2, side/2)
        tokens = model.patch_embed.proj(crops).flatten(2).transpose(1, 2)  # (B*k, (side/p)², D)
        return tokens.reshape(*regions.shape, -1, tokens.shape[-1])

    def tokenize_flops(self, model: LVViT, height: int, width: int) -> float:
        stem = model.patch_embed
        return stem.features_flops(height, width) + stem.proj_flops((height // stem.patch_size) * (width // stem.patch_size))

    def tokenize_regions_flops(self, model: LVViT, height: int, width: int, grid: int, count: int) -> float:
        stem = model.patch_embed
        per_region = (height // grid // stem.patch_size) * (width // grid // stem.patch_size)
        return stem.features_flops(height, width) + stem.proj_flops(count * per_region)

    def dense_head(self, model: LVViT, tokens: Tensor) -> Tensor:
        return model.aux_head(tokens[:, 1:])

    def train_heads(self, model: LVViT, x: Tensor) -> TrainHeads:
        return model.forward_with_heads(x)

    def head_flops(self, model: LVViT, tokens: int) -> float:
        return tokens * model.embed_dim * model.num_classes

    def gflops(self, model: LVViT) -> float:
        d = self.dims(model)
        tokens = 1 + d.num_patches
        blocks = d.depth * block_flops(tokens, d.dim, d.num_heads, d.mlp_hidden)
        return (self.tokenize_flops(model, model.img_size, model.img_size) + blocks
                + norm_flops(tokens, d.dim) + self.head_flops(model, tokens)) / 1e9

    def input_size(self, model: LVViT) -> tuple[int, int, int]:
        return (model.patch_embed.in_chans, model.img_size, model.img_size)


def load_lvvit_weights(model: LVViT, pretrained: bool | str, name: str) -> None:
    """Load a local LV-ViT state_dict (the TokenLabeling release's layout, or ``{"model": ...}``).

    Args:
        model: the model to fill.
        pretrained: the file's path (True, a download, is not offered: no hub hosts LV-ViT).
        name: the architecture, for messages.
    """
    from adaptive_vit.checkpoints import load_checkpoint_file, short_list

    if pretrained is True:
        raise ValueError(f"{name}: no download is available for LV-ViT weights; pass a local file "
                         "(`pretrained: /path/to/lvvit_s-26M-224-83.3.pth.tar`).")
    state = load_checkpoint_file(pretrained, what="pretrained")
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"pretrained {pretrained!r} does not fit {name}: missing keys {short_list(missing)}, "
                         f"unexpected keys {short_list(unexpected)}.")
