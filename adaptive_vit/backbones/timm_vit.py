"""The timm ViT family: timm `VisionTransformer`s with tap-able blocks, and offline weights.

`Block` and `Attention` are timm's, subclassed so that a method can ask one block for what it
needs without giving up the fused attention kernel everywhere else:

- an additive term on the pre-softmax logits (DVT's relationship reuse) goes in `attn_mask`,
  exactly as timm (and `scaled_dot_product_attention`) take it;
- `tap="cls"` also returns the post-softmax attention of the cls query, (B, H, N), computed on
  the side from the same q and k (one query per head), so the block itself still runs fused
  (CF-ViT's global class attention);
- `tap="logits"` also returns the full pre-softmax logits, (B, H, N, N), bias included; this one
  needs the explicit path (DVT's upstream models hand them downstream).

Extra keyword arguments pass through to timm, so newer timm block signatures keep working.
"""

from __future__ import annotations

import difflib
import os
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from adaptive_vit.backbones.spec import BackboneDims, BackboneFamily, BackboneSpec
from adaptive_vit.flops import vit_flops

Tap = Literal["cls", "logits"] | None


class Attention(TimmAttention):
    """timm's multi-head self-attention that can also hand back the cls row or the logits.

    The kernel is timm's own switch, `fused_attn` (True = `scaled_dot_product_attention`, timm's
    default unless TIMM_FUSED_ATTN=0; False = explicit matmuls; `set_fused_attn` sets it). On GPUs
    the fused kernels are far faster; what each path measured on a CPU is in docs/performance.md.
    """

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        tap: Tap = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, E)
        q, k = self.q_norm(q), self.k_norm(k)

        extra = None
        if tap != "logits" and not is_causal and self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
            )
            if tap == "cls":
                extra = self._cls_row(q, k, attn_mask)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if attn_mask is not None or is_causal:
                logits += _additive(attn_mask, is_causal, N, logits)  # in place: a fresh matmul output
            attn = logits.softmax(dim=-1)
            if tap == "logits":
                extra = logits
            elif tap == "cls":
                extra = attn[:, :, 0, 1:]
            x = self.attn_drop(attn) @ v

        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x if tap is None else (x, extra)

    def _cls_row(self, q: Tensor, k: Tensor, attn_mask: Tensor | None) -> Tensor:
        """Post-softmax attention of the cls query over the patch keys: (B, H, N-1)."""
        logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        if attn_mask is not None:
            logits = logits + _additive(attn_mask, False, k.shape[-2], logits)[..., :1, :]
        return logits.softmax(dim=-1)[:, :, 0, 1:]


def _additive(attn_mask: Tensor | None, is_causal: bool, n: int, like: Tensor) -> Tensor:
    """An attention mask as an additive term (bool masks: False → -inf), as SDPA reads it."""
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


class Block(TimmBlock):
    """timm's pre-norm transformer block, with `tap` passed to its attention."""

    def __init__(self, *args, **kwargs) -> None:
        # VisionTransformer passes timm's plain Attention explicitly: swap in the tap-able one.
        if kwargs.get("attn_layer") in (None, TimmAttention):
            kwargs["attn_layer"] = Attention
        super().__init__(*args, **kwargs)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        tap: Tap = None,
        **kwargs,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if tap is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
        y, extra = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, tap=tap)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, extra


def set_fused_attn(model: torch.nn.Module, fused: bool | None) -> None:
    """Choose the attention kernel of every `Attention` in `model` (None: leave timm's choice,
    fused SDPA unless TIMM_FUSED_ATTN=0)."""
    if fused is None:
        return
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused


def create_vit(
    name: str = "deit_small_patch16_224",
    pretrained: bool | str = False,
    num_classes: int = 1000,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    fused_attn: bool | None = None,
    **overrides,
) -> VisionTransformer:
    """Build a timm VisionTransformer whose blocks are this module's `Block`.

    Args:
        name: any timm VisionTransformer, e.g. ``deit_small_patch16_224``.
        pretrained: False; True (download through timm: needs a network); or the path of a
            local weights file (``.pth``/``.safetensors``/``.bin``) in the timm layout, loaded
            through timm's ``pretrained_cfg_overlay`` so it works offline. A classifier of
            another class count is dropped, position embeddings are resampled to ``img_size``.
        num_classes: classifier outputs.
        img_size: input side; None keeps the model's default.
        patch_size: patch side; None keeps the model's default.
        drop_path_rate: stochastic depth rate.
        fused_attn: attention kernel (see `Attention`; None: timm's default, fused).
        overrides: further timm keyword arguments (``embed_dim``, ``depth``, ``num_heads``...).
    """
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, block_fn=Block, **overrides)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    try:
        model = create_timm_model(name, pretrained, "head.weight", **kwargs)
    except TypeError as err:
        if "block_fn" in str(err):  # a CNN or another architecture without transformer blocks
            raise ValueError(f"{name!r} is not a timm VisionTransformer (it takes no block_fn).") from None
        raise
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer.")
    set_fused_attn(model, fused_attn)
    return model


def create_timm_model(name: str, pretrained: bool | str, classifier: str, **kwargs) -> nn.Module:
    """`timm.create_model(name, **kwargs)` with this project's handling of `pretrained`.

    Args:
        name: a timm model name (checked, with "did you mean" suggestions).
        pretrained: False; True (download through timm: needs a network); or the path of a local
            weights file in the timm layout, loaded through timm's ``pretrained_cfg_overlay`` so it
            works offline (a classifier of another class count is dropped by timm).
        classifier: the state_dict key of the classifier weight, to read the file's class count.
        kwargs: timm's keyword arguments (num_classes, img_size, ...).
    """
    _check_name(name)
    if isinstance(pretrained, str):
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained weights file not found: {pretrained!r}. Pass the path of a timm-layout "
                f"state_dict for {name!r} (e.g. the file timm downloads to ~/.cache), or "
                "`pretrained: false`."
            )
        # timm keeps the file's classifier only if the overlay states its class count.
        overlay = dict(file=path, num_classes=_file_num_classes(path, classifier))
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    else:
        kwargs["pretrained"] = bool(pretrained)
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if isinstance(pretrained, str) and ("state_dict" in str(err) or "size mismatch" in str(err)):
            shown = {k: v for k, v in kwargs.items() if k not in ("pretrained", "pretrained_cfg_overlay", "block_fn")}
            raise ValueError(
                f"weights in {pretrained!r} do not fit {name!r} ({shown}): "
                f"{_first_lines(err)}. Use the backbone name these weights were trained as."
            ) from None
        raise
    except OSError as err:  # hub download without a network, mostly
        if pretrained is True:
            raise RuntimeError(
                f"could not download pretrained weights for {name!r} ({_first_lines(err)}). "
                "Offline? Pass a local file instead: `pretrained: /path/to/weights.pth`."
            ) from None
        raise


def _file_num_classes(path: str, classifier: str) -> int:
    """Rows of the classifier `classifier` stored in a timm-layout weights file (0 if it has none)."""
    from timm.models import load_state_dict

    head = load_state_dict(path).get(classifier)
    return 0 if head is None else head.shape[0]


def _check_name(name: str) -> None:
    known = timm.list_models()
    if name not in known and name.split(".")[0] not in known:
        close = [n for n in known if n.startswith(name)][:5] or difflib.get_close_matches(name, known, n=5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}: not a timm model name.{hint} "
            "See `timm.list_models('deit*')` / `timm.list_models('vit_*')`."
        )


def _first_lines(err: BaseException, n: int = 3) -> str:
    return " ".join(str(err).strip().splitlines()[:n])


def vit_dims(model: VisionTransformer) -> dict[str, int]:
    """The numbers a cost formula needs: width D, depth L, heads H, MLP hidden M, tokens..."""
    block = model.blocks[0]
    grid = model.patch_embed.grid_size
    return dict(
        dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_hidden=block.mlp.fc1.out_features,
        num_patches=grid[0] * grid[1],
        num_prefix_tokens=model.num_prefix_tokens,
        patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes,
    )


class TimmViTFamily(BackboneFamily):
    """Every timm `VisionTransformer` with one class token (DeiT, ViT, ...), blocks swapped for
    this module's tap-able `Block`."""

    name = "timm_vit"
    model_class = VisionTransformer

    def handles(self, name: str) -> bool:
        return True  # asked last: any other name gets timm's "unknown model" message

    def create(self, spec: BackboneSpec, num_classes: int) -> VisionTransformer:
        return create_vit(
            spec.name, pretrained=spec.pretrained, num_classes=num_classes, img_size=spec.img_size,
            patch_size=spec.patch_size, drop_path_rate=spec.drop_path_rate, fused_attn=spec.fused_attn,
            **spec.kwargs,
        )

    def dims(self, model: VisionTransformer) -> BackboneDims:
        d = vit_dims(model)
        del d["num_patches"]
        return BackboneDims(grid=tuple(model.patch_embed.grid_size), **d)

    def tokenize(self, model: VisionTransformer, x: Tensor) -> Tensor:
        # timm's PatchEmbed without its input-size check (CF-ViT embeds other sizes too)
        embed = model.patch_embed
        return embed.norm(embed.proj(x).flatten(2).transpose(1, 2))

    def pre_blocks(self, model: VisionTransformer, tokens: Tensor) -> Tensor:
        return model.norm_pre(model.pos_drop(tokens))

    def embed(self, model: VisionTransformer, x: Tensor) -> Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    def head(self, model: VisionTransformer, tokens: Tensor) -> Tensor:
        return model.forward_head(tokens)

    def gflops(self, model: VisionTransformer) -> float:
        return vit_flops(**vit_dims(model)) / 1e9

    def input_size(self, model: VisionTransformer) -> tuple[int, int, int]:
        img = model.patch_embed.img_size
        return (model.patch_embed.proj.in_channels, img[0], img[1])
