"""The CF-ViT authors' DeiT checkpoints (github.com/ChenMnZ/CF-ViT, `cf_deit_small`) → `CFViT`.

Their file is ``{"model": state_dict, "flop": [...], ...}`` (docs/methods.md, CF-ViT: the
authors' code; 9×9: only the two position embeddings differ). Their module structure, read off
the key names and their `deit/models_deit.py`:

- ``patch_embed.proj``, ``cls_token``, ``blocks.*`` (norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2), ``norm``, ``head``: a timm DeiT with the same names (LayerNorm eps 1e-6,
  qkv bias, scale head_dim^-0.5) → ``vit.*`` here;
- ``pos_embed_list.0`` (1+Nc) the coarse, ``pos_embed_list.1`` (1+4Nc) the fine position
  embedding → ``coarse_pos_embed`` and ``vit.pos_embed``;
- ``reuse_block.0`` a LayerNorm and ``reuse_block.1.fc1/fc2`` an MLP D → 4D → D with GELU on the
  coarse output tokens after the final norm → ``reuse.0`` and ``reuse.1.fc1/fc2``.

Assumptions about their code that make the converted model compute their function:
- their coarse input is ``F.interpolate(img, 112, mode="bilinear", align_corners=True)`` of the
  normalised 224 image (no antialiasing), as in `CFViT.coarse_stage`;
- with informative selection, their fine sequence is cls (+ fine pos[0]), the fine tokens of the
  top-k regions (embedding + reuse + fine pos) and the other coarse tokens (coarse embedding +
  coarse pos), in a different order than ours, which does not change the function;
- their global class attention (an EMA over whole attention maps, reduced afterwards) equals
  ours (EMA of the head-averaged cls row) by linearity. At their current head (``84a05dd``)
  both their `forward` and their `forward_early_exit` start it at block 3, as the paper and
  ``cls_attn_start: 3`` do; only their first two commits (``bb4cf40``, ``1c3343b``) start
  `forward` at block 2 (``cls_attn_start: 2`` reproduces that `forward`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from adaptive_vit.checkpoints import short_list

# (their prefix, our prefix), first match wins; the last one maps the DeiT body.
_RENAMES = (
    ("pos_embed_list.0", "coarse_pos_embed"),
    ("pos_embed_list.1", "vit.pos_embed"),
    ("reuse_block.", "reuse."),
    ("", "vit."),
)
_MARKERS = ("pos_embed_list.", "reuse_block.")


def is_authors_checkpoint(checkpoint: Any) -> bool:
    """Their layout: ``{"model": state_dict}`` (or the bare state_dict) with their key names."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    return isinstance(state, dict) and any(str(k).startswith(_MARKERS) for k in state)


def authors_key(ours: str) -> str:
    """Our `CFViT` state_dict key → theirs."""
    for theirs_prefix, ours_prefix in _RENAMES:
        if ours.startswith(ours_prefix):
            return theirs_prefix + ours[len(ours_prefix):]
    raise KeyError(ours)


def convert_authors_checkpoint(checkpoint: dict[str, Any], net: nn.Module) -> dict[str, Tensor]:
    """Map every tensor of their state_dict onto `net`'s keys, checking names and shapes.

    Args:
        checkpoint: their file's content (``{"model": state_dict, ...}``) or the state_dict.
        net: the `CFViT` to load into (its keys and shapes are the target).

    Raises:
        ValueError: naming the missing and unexpected keys, or the mismatched shapes.
    """
    state = checkpoint.get("model", checkpoint)
    targets = {k: v for k, v in net.state_dict().items() if k != "exit_thresholds"}
    wanted = {authors_key(k): k for k in targets}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ValueError(
            "checkpoint in the CF-ViT authors' layout does not fit this CFViT: missing keys "
            f"{short_list(missing)}, unexpected keys {short_list(unexpected)}. Their released models are "
            "DeiT-S (backbone deit_small_patch16_224, 12 blocks) and LV-ViT-S (backbone lvvit_s, 16 blocks, "
            "patch_embed.conv1..3 and aux_head), with 1000 classes."
        )
    mismatched = [
        f"{theirs} {list(state[theirs].shape)} vs {list(targets[ours].shape)}"
        for theirs, ours in wanted.items() if state[theirs].shape != targets[ours].shape
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint in the CF-ViT authors' layout has other shapes than this CFViT: "
            f"{short_list(mismatched)}. pos_embed_list.0/1 of [1, 50, D]/[1, 197, D] are the 7×7 model "
            "(coarse_grid: 7, img_size 224), [1, 82, D]/[1, 325, D] the 9×9 one (coarse_grid: 9, "
            "img_size 288); head rows are the class count."
        )
    return {ours: state[theirs] for theirs, ours in wanted.items()}
