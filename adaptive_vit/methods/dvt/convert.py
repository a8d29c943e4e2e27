"""The DVT authors' released checkpoints → this tool's `DVT` state_dict.

Their file is ``{"model_state_dict": {...}, "flops", "dynamic_threshold", ...}`` with one model per
exit under ``less_less_token.`` (7×7), ``less_token.`` (10×10) and ``normal_token.`` (14×14)
(layout: tests/reference/dvt_deit_small_authors_keys.json). What the key names and shapes
tell, and what this converter (and `DVT`) assume so that the same weights compute the same
function:

- Each exit is a timm-style DeiT (cls_token, pos_embed, patch_embed.proj, blocks, norm, head), or
  a T2T-ViT (``tokens_to_token.attention1/2`` with their fixed random features ``w``, ``project``,
  the sinusoidal ``pos_embed``; layouts tests/reference/dvt_t2t_vit_{12,14}_authors_keys.json,
  the `T2TViT` module names are theirs): its keys land unchanged under ``exits.{k}.vit.``. The 10×10 patch conv is [384, 3, 23, 23]
  with pos_embed of 1+100 tokens: kernel = stride = 23 with padding 3 on a 224 image.
- ``blocks.{i}.feature_resuse_mlp`` (their spelling) = Sequential(LayerNorm(384),
  Mlp(fc1 384→128, GELU, fc2 128→48)) → our ``feature_reuse.norm`` / ``feature_reuse.mlp``.
  Its norm2 is [432] and fc1 [1536, 432]: the 48 reused channels are concatenated AFTER the 384
  token channels (assumed order: fc1's first 384 columns read the tokens, as in `ReuseBlock`).
- ``relation_reuse_conv.0/.2`` = Conv2d(72, 216, 1) and Conv2d(216, 72, 1) with a parameterless
  activation between (GELU, docs/methods.md "DVT: relationship reuse"): the shared relation MLP over H·L = 6·12 upstream
  logits → our ``exits.{k}.relation_reuse.mlp.0/.2``.
- Not in the weights, taken from docs/methods.md ("DVT: the authors' code"): upstream features before the final norm, logits
  after the scale and the upstream's own reuse term, nearest ×2 + adaptive average pool resizes
  (keys, then queries), LayerNorm eps 1e-6 (DeiT's), exact GELU.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from adaptive_vit.checkpoints import short_list

# The authors' exit models, coarsest first. A 2-exit release keeps the first and the last name.
AUTHORS_EXITS = ("less_less_token", "less_token", "normal_token")

_RENAMES = (  # inside one exit model: theirs → ours (relative to `exits.{k}.`)
    (".feature_resuse_mlp.0.", ".feature_reuse.norm."),
    (".feature_resuse_mlp.1.", ".feature_reuse.mlp."),
)


def convert_authors_checkpoint(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the authors' ``model_state_dict`` onto a `DVT` state_dict, checking every tensor.

    Args:
        state: the authors' ``checkpoint["model_state_dict"]``.
        target: the state_dict of the `DVT` to load into (names and shapes to match).
    Returns:
        A state_dict for ``DVT.load_state_dict`` holding every one of the authors' tensors.
    Raises:
        ValueError: naming the authors' keys with no place in this DVT, the keys of this DVT
            the file lacks, and any shape that differs.
    """
    present = [name for name in AUTHORS_EXITS if any(k.startswith(name + ".") for k in state)]
    converted: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unexpected = []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in present:
            unexpected.append(key)
            continue
        ours = f"exits.{present.index(prefix)}.{_rename(rest)}"
        converted[ours], origin[ours] = value, key
    unexpected += [origin[k] for k in converted if k not in target]
    missing = [k for k in target if k not in converted and k != "exit_thresholds"]
    shapes = [f"{origin[k]} {list(v.shape)} -> {k} {list(target[k].shape)}"
              for k, v in converted.items() if k in target and v.shape != target[k].shape]
    if unexpected or missing or shapes:
        raise ValueError(
            f"the DVT authors' checkpoint (exits {present}) does not fit this DVT "
            f"({len([k for k in target if k.endswith('.cls_token')])} exits): "
            f"unexpected keys {short_list(unexpected)}, missing keys {short_list(missing)}, "
            f"shape mismatches {short_list(shapes)}. Configure the same backbone, patch_sizes/paddings "
            "(DeiT-S: [32, 23, 16] / [0, 3, 0]) or exit_kwargs (T2T-ViT: configs/dvt_t2t_vit_12.yaml), "
            "num_classes and reuse switches as the checkpoint."
        )
    return converted


def _rename(rest: str) -> str:
    if rest.startswith("relation_reuse_conv."):
        return "relation_reuse.mlp." + rest[len("relation_reuse_conv."):]
    for theirs, ours in _RENAMES:
        rest = rest.replace(theirs, ours)
    return "vit." + rest


def authors_extras(checkpoint: dict[str, Any]) -> str | None:
    """What the authors' file holds besides the weights and is worth seeing next to this tool's
    own figures: their per-exit ``flops`` and their ``dynamic_threshold`` (the exit thresholds of
    their budgeted evaluation). None when it holds neither."""
    found = {key: checkpoint[key] for key in ("flops", "dynamic_threshold") if key in checkpoint}
    if not found:
        return None
    shown = ", ".join(f"{key} {_compact(value)}" for key, value in found.items())
    return (f"The authors' checkpoint also holds {shown}. Compare with `adaptive-vit flops` and with "
            "the thresholds ThresholdCalibration fits; to test at one of theirs, pass it as "
            "--model.init_args.thresholds [t1, t2].")


def _compact(value: Any, limit: int = 200) -> str:
    """A numeric value (tensor, array, nested lists) on one line, cut at `limit` characters."""
    text = " ".join(repr(value.tolist() if hasattr(value, "tolist") else value).split())
    return text if len(text) <= limit else text[:limit] + " …"
