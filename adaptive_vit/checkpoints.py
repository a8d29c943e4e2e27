"""Loading weights from files: this tool's checkpoints, plain state_dicts, other code bases'.

Checkpoints and weights from elsewhere are untrusted pickles: every file goes through
`load_checkpoint_file` (``torch.load(..., weights_only=True)`` with a short allowlist), and every
way a file can be wrong ends in one `ValueError` (or `FileNotFoundError`) naming the file and the
fix. `load_init_weights` is `init_from`: it turns whatever the file holds into the network's
state_dict with the method's own hooks (`convert_foreign_checkpoint`, `accepts_checkpoint_of`,
`may_be_missing`), so the methods only say what they recognise.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from adaptive_vit.methods.base import AdaptiveLitModule


def load_checkpoint_file(path: str, extra_safe_globals: Iterable[Any] = (), what: str = "checkpoint") -> Any:
    """`torch.load` an untrusted file with `weights_only=True`, allowlisting only what checkpoints
    commonly hold beside tensors (argparse.Namespace, numpy scalars and arrays).

    Args:
        path: the file (``~`` is expanded).
        extra_safe_globals: further types a caller knows a layout holds.
        what: how the file is named in messages (``--ckpt_path``, ``init_from``...).
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what}: no such file {path!r}. Pass a checkpoint written by `adaptive-vit fit` "
            "(runs/<name>/version_N/checkpoints/*.ckpt) or a state_dict file."
        )
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    # numpy 1.x pickles name numpy.core.*, numpy 2.x numpy._core.*: allow both spellings.
    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype, *extra_safe_globals]
    for name in ("scalar", "_reconstruct"):
        obj = getattr(multiarray, name)
        allowed += [(obj, f"numpy.core.multiarray.{name}"), (obj, f"numpy._core.multiarray.{name}")]
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors name the type that is not allowed
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{what}: could not load {path!r} safely ({first}). Is the file complete (not truncated by "
            "an interrupted copy) and a PyTorch checkpoint? Files are loaded with weights_only=True; "
            "convert one that holds other Python objects to a plain state_dict "
            "(torch.save(ckpt['model'], 'weights.pth'))."
        ) from None


def load_init_weights(module: AdaptiveLitModule, path: str) -> None:
    """`init_from`: load a `.ckpt` of this tool, a state_dict, or a layout the method recognises
    into `module.net`, and the checkpoint's calibrated budgets if it has any."""
    checkpoint = load_checkpoint_file(path, what="init_from")
    state = network_state(module, checkpoint, path)
    missing, unexpected = module.net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "exit_thresholds" and not module.may_be_missing(k)]
    if missing or unexpected:
        raise ValueError(
            f"init_from {path!r} does not fit {type(module.net).__name__}: "
            f"missing keys {short_list(missing)}, unexpected keys {short_list(unexpected)}. "
            "Is it a checkpoint of another method or backbone? Use a checkpoint of the same "
            "method and backbone configuration."
        )
    if isinstance(checkpoint, dict) and "calibrations" in checkpoint.get("adaptive_vit", {}):
        module.exit_policy.calibrations = dict(checkpoint["adaptive_vit"]["calibrations"])


def load_run_checkpoint(module: AdaptiveLitModule, path: str, what: str = "--ckpt_path") -> None:
    """Weights and calibrated budgets of a checkpoint written by `adaptive-vit fit` into `module`
    (as Lightning restores them for `--ckpt_path`; used where no Trainer loads it, `benchmark`)."""
    checkpoint = load_checkpoint_file(path, what=what)
    if not (isinstance(checkpoint, dict) and "state_dict" in checkpoint):
        raise ValueError(
            f"{what} {path!r} is not a checkpoint written by `adaptive-vit fit` (no 'state_dict'). "
            "For weights from elsewhere use model.init_args.init_from."
        )
    restore_saved_state(module, checkpoint)
    module.load_state_dict(checkpoint["state_dict"])


def restore_saved_state(module: AdaptiveLitModule, checkpoint: dict[str, Any]) -> None:
    """What this tool adds to a checkpoint (`AdaptiveLitModule.on_save_checkpoint`): refuse
    another method's checkpoint, and take its calibrated budgets."""
    saved = checkpoint.get("adaptive_vit", {})
    method = saved.get("method")
    if method and method != type(module).__name__:
        raise ValueError(
            f"this checkpoint was written by {method}, but the configured model is "
            f"{type(module).__name__}. Use the config the checkpoint was trained with "
            "(the run's saved config.yaml) or a checkpoint of this method."
        )
    module.exit_policy.calibrations = dict(saved.get("calibrations", {}))


def network_state(module: AdaptiveLitModule, checkpoint: Any, path: str) -> dict[str, Tensor]:
    """The network state_dict held by `checkpoint` (a loaded file), for `module`'s method."""
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:
        method = checkpoint.get("adaptive_vit", {}).get("method")
        if method and method != type(module).__name__ and not module.accepts_checkpoint_of(method):
            raise ValueError(
                f"init_from {path!r} is a {method} checkpoint, not {type(module).__name__}. "
                "Use a checkpoint written by the same method (or its earlier stage)."
            )
        return {k[len("net."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    foreign = module.convert_foreign_checkpoint(checkpoint) if isinstance(checkpoint, dict) else None
    if foreign is not None:
        return foreign
    if isinstance(checkpoint, dict) and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return checkpoint
    keys = short_list(list(checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(
        f"init_from {path!r}: not a checkpoint of this tool, not a state_dict, and not a layout "
        f"{type(module).__name__} recognises (top-level keys: {keys})."
    )


def short_list(keys: list[str], n: int = 8) -> str:
    """The first `n` keys, and how many there are in all."""
    keys = list(keys)
    return "[]" if not keys else str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")
