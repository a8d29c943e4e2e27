"""`VisualizeDecisions`: PNGs of what an adaptive network decided for a few images, at `predict`.

    adaptive-vit predict --config configs/demo/cfvit.yaml --ckpt_path runs/.../last.ckpt \
        --trainer.callbacks+=VisualizeDecisions

It asks the LightningModule's network for its adaptive answer (`forward_adaptive` at the current
`exit_thresholds`) and its `decision_maps`, and writes into ``output_dir``:

- ``exits.png`` (every method): each image with its prediction, the exit that answered and that
  exit's confidence (DVT's 4x4 / 6x6 / 8x8 exits, CF-ViT's coarse / fine stage, "final" for
  single-exit models);
- ``regions.png`` (maps with ``regions`` (B, g, g), CF-ViT): the coarse patches re-split into
  2×2 fine patches, outlined over the image; images answered by the coarse stage are titled so;
- ``tokens.png`` (maps with ``tokens`` (B, L, rows, cols), MIA-Former): one row per image, one
  column per block, dropped patch tokens greyed out, skipped blocks greyed entirely, the active
  heads (``heads`` (B, L, H)) and executed blocks (``blocks`` (B, L)) written under each cell;
- ``decisions.json``: the same per image (batch and row in the predict data, label, prediction,
  exit, confidence, GFLOPs, maps as 0/1 lists).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

KNOWN_MAPS = ("regions", "tokens", "blocks", "heads")
GREY, GREY_WEIGHT = 0.5, 0.7  # a dropped patch token is drawn as 0.7·grey + 0.3·image
CELL_INCHES = 1.6


class VisualizeDecisions(Callback):
    """Write PNGs of the exits, re-split regions and kept tokens/heads/blocks of `max_images`
    predicted images (see the module docstring), spread evenly over the predict batches (the
    same few from each batch; the first ones when the number of batches is unknown). Runs at
    `predict` only; the global-zero process draws and writes its own images.

    Args:
        output_dir: folder for the PNGs and ``decisions.json``; default
            ``<trainer.log_dir>/decisions`` (the predict run's folder, or ``default_root_dir``
            without a logger). Created if missing.
        max_images: how many images to draw.
        columns: images per row in ``exits.png`` and ``regions.png``.
        dpi: resolution of the PNGs.
    """

    def __init__(self, output_dir: str | None = None, max_images: int = 16, columns: int = 8,
                 dpi: int = 100) -> None:
        if max_images < 1:
            raise ValueError(f"VisualizeDecisions: max_images must be at least 1, got {max_images}.")
        if columns < 1:
            raise ValueError(f"VisualizeDecisions: columns must be at least 1, got {columns}.")
        self.output_dir = output_dir
        self.max_images, self.columns, self.dpi = max_images, columns, dpi
        self.directory: str | None = None
        self._batches: list[dict[str, Any]] = []
        self._count = 0
        self._per_batch = max_images

    # ------------------------------------------------------------------ hooks

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call: every rank asks
        self.directory = self.output_dir or os.path.join(log_dir or trainer.default_root_dir, "decisions")
        _ensure_writable(self.directory)  # on every rank, so that all of them stop on a bad folder
        self._batches, self._count = [], 0
        batches = sum(trainer.num_predict_batches)  # inf for data of unknown length
        known = math.isfinite(batches) and batches > 0
        self._per_batch = math.ceil(self.max_images / batches) if known else self.max_images

    @torch.no_grad()
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch  # (B, C, H, W)
        take = min(self.max_images - self._count, self._per_batch, x.shape[0])
        if take <= 0:
            return
        rows = torch.arange(take, device=x.device) * x.shape[0] // take  # evenly spaced in the batch
        x = x[rows]
        labels = batch[1][rows] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        net = pl_module.net
        out = net.forward_adaptive(x, net.exit_thresholds.tolist())
        maps = net.decision_maps(x)
        self._batches.append({
            "images": x.detach().float().cpu(),
            "where": [(batch_idx, r) for r in rows.tolist()],  # (batch, row) in the predict data
            "labels": None if labels is None or labels.ndim != 1 else labels.cpu(),
            "prediction": out.logits.argmax(-1).cpu(),
            "confidence": out.logits.float().softmax(-1).amax(-1).cpu(),
            "exit": out.exit_index.cpu(),
            "gflops": out.gflops.float().cpu(),
            "maps": {k: v.cpu() for k, v in maps.items()},
        })
        self._count += x.shape[0]

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self._batches:
            return
        decisions = _concatenate(self._batches)
        net = pl_module.net
        unknown = sorted(set(decisions["maps"]) - set(KNOWN_MAPS))
        if unknown:
            rank_zero_warn(f"VisualizeDecisions: no drawing for decision maps {unknown} of "
                           f"{type(net).__name__} (drawn: {', '.join(KNOWN_MAPS)}).")
        images = _to_pixels(decisions["images"], *_mean_std(trainer))
        names = _class_names(trainer)
        captions = [_caption(decisions, i, net.exit_names, names) for i in range(len(images))]
        counts = decisions["exit"].bincount(minlength=net.num_exits).tolist()
        title = (f"{type(net).__name__}, thresholds {[round(t, 4) for t in net.exit_thresholds.tolist()]}: "
                 + ", ".join(f"{n} images at exit {name}" for name, n in zip(net.exit_names, counts)))
        written = [self._save(plot_exits(images, captions, self.columns, title), "exits.png")]
        if "regions" in decisions["maps"]:
            figure = plot_regions(images, decisions["maps"]["regions"], captions, self.columns,
                                  f"{title}\noutlined: coarse patches re-split into 2×2 fine patches")
            written.append(self._save(figure, "regions.png"))
        if "tokens" in decisions["maps"]:
            figure = plot_blocks(images, decisions["maps"], captions,
                                 f"{type(net).__name__}: kept tokens per block (dropped greyed)")
            written.append(self._save(figure, "tokens.png"))
        path = os.path.join(self.directory, "decisions.json")
        with open(path, "w") as f:
            json.dump(_records(decisions, net.exit_names), f, indent=1)
        rank_zero_info(f"VisualizeDecisions: decisions of {len(images)} images written to "
                       f"{self.directory} ({', '.join(os.path.basename(p) for p in written)}, decisions.json)")

    def _save(self, figure: Figure, name: str) -> str:
        path = os.path.join(self.directory, name)
        figure.savefig(path, dpi=self.dpi)
        return path


# ---------------------------------------------------------------------- collecting


def _ensure_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ValueError(
            f"VisualizeDecisions: cannot write to output_dir {directory!r} ({err.strerror or err}). "
            "Give a writable folder, e.g. --trainer.callbacks+=VisualizeDecisions "
            "--trainer.callbacks.output_dir decisions/"
        ) from None


def _concatenate(batches: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("images", "prediction", "confidence", "exit", "gflops"):
        out[key] = torch.cat([b[key] for b in batches])
    out["where"] = [place for b in batches for place in b["where"]]
    labelled = all(b["labels"] is not None for b in batches)
    out["labels"] = torch.cat([b["labels"] for b in batches]) if labelled else None
    out["maps"] = {k: torch.cat([b["maps"][k] for b in batches]) for k in batches[0]["maps"]}
    return out


def _mean_std(trainer: Trainer) -> tuple[Any, Any]:
    """The data module's normalisation (ImageDataModule exposes `mean` and `std`), else None."""
    datamodule = getattr(trainer, "datamodule", None)
    return getattr(datamodule, "mean", None), getattr(datamodule, "std", None)


def _class_names(trainer: Trainer) -> list[str] | None:
    try:
        return list(trainer.datamodule.class_names)
    except (AttributeError, OSError, ValueError):
        return None


def _to_pixels(images: Tensor, mean: Any, std: Any) -> np.ndarray:
    """(B, C, H, W) normalised → (B, H, W, 3) in [0, 1]: undo mean/std when known, else stretch
    each image to its own range."""
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        images = images * torch.as_tensor(std).view(shape) + torch.as_tensor(mean).view(shape)
    else:
        low = images.amin((1, 2, 3), keepdim=True)
        images = (images - low) / (images.amax((1, 2, 3), keepdim=True) - low).clamp(min=1e-8)
    images = images.clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images[:, :3].permute(0, 2, 3, 1).numpy()


def _caption(decisions: dict[str, Any], i: int, exit_names: tuple[str, ...],
             class_names: list[str] | None) -> tuple[str, str]:
    """(text, colour) above image i: prediction (and label), exit that answered, its confidence."""
    def name(c: int) -> str:
        return class_names[c] if class_names and c < len(class_names) else str(c)

    prediction = int(decisions["prediction"][i])
    text = f"pred {name(prediction)}"
    colour = "black"
    if decisions["labels"] is not None:
        label = int(decisions["labels"][i])
        text += f" (true {name(label)})"
        colour = "green" if label == prediction else "red"
    text += f"\n{exit_names[int(decisions['exit'][i])]}  p={float(decisions['confidence'][i]):.2f}"
    return text, colour


def _records(decisions: dict[str, Any], exit_names: tuple[str, ...]) -> list[dict[str, Any]]:
    records = []
    for i in range(len(decisions["prediction"])):
        record = {
            "batch": decisions["where"][i][0],
            "row": decisions["where"][i][1],
            "label": None if decisions["labels"] is None else int(decisions["labels"][i]),
            "prediction": int(decisions["prediction"][i]),
            "exit": int(decisions["exit"][i]),
            "exit_name": exit_names[int(decisions["exit"][i])],
            "confidence": round(float(decisions["confidence"][i]), 6),
            "gflops": float(decisions["gflops"][i]),
        }
        record.update({k: v[i].int().tolist() for k, v in decisions["maps"].items()})
        records.append(record)
    return records


# ---------------------------------------------------------------------- drawing


def _grid(count: int, columns: int, title: str, rows_extra: float = 0.0) -> tuple[Figure, list[Any]]:
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(CELL_INCHES * columns, CELL_INCHES * 1.25 * rows + 0.6 + rows_extra),
                    layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    figure.suptitle(title, fontsize=8)
    return figure, list(axes[:count])


def _show(ax: Any, image: np.ndarray, caption: tuple[str, str]) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_title(caption[0], fontsize=7, color=caption[1])


def plot_exits(images: np.ndarray, captions: list[tuple[str, str]], columns: int, title: str) -> Figure:
    """Each image with its prediction, the exit that answered and its confidence.

    Args:
        images: (B, H, W, 3) pixels in [0, 1].
        captions: per image (text, colour), from `_caption`.
        columns: images per row.
        title: figure title.
    """
    figure, axes = _grid(len(images), columns, title)
    for ax, image, caption in zip(axes, images, captions):
        _show(ax, image, caption)
    return figure


def plot_regions(images: np.ndarray, regions: Tensor, captions: list[tuple[str, str]], columns: int,
                 title: str) -> Figure:
    """Each image with its re-split coarse patches outlined (and split 2×2 by dashed lines).

    Args:
        images: (B, H, W, 3) pixels in [0, 1].
        regions: (B, g, g) bool, True where the coarse patch was re-split.
        captions: per image (text, colour).
        columns: images per row.
        title: figure title.
    """
    figure, axes = _grid(len(images), columns, title)
    for ax, image, mask, caption in zip(axes, images, regions, captions):
        _show(ax, image, caption)
        height, width = image.shape[:2]
        g_rows, g_cols = mask.shape
        h, w = height / g_rows, width / g_cols
        for r, c in mask.nonzero().tolist():
            top, left = r * h - 0.5, c * w - 0.5  # imshow puts pixel centres on integers
            ax.add_patch(Rectangle((left, top), w, h, facecolor=(1, 0.2, 0.2, 0.15), edgecolor="red", lw=1))
            ax.plot([left + w / 2] * 2, [top, top + h], color="red", lw=0.5, ls="--")
            ax.plot([left, left + w], [top + h / 2] * 2, color="red", lw=0.5, ls="--")
        if not mask.any():
            ax.set_title(caption[0] + "\n(answered by the coarse stage)", fontsize=7, color=caption[1])
    return figure


def plot_blocks(images: np.ndarray, maps: dict[str, Tensor], captions: list[tuple[str, str]],
                title: str) -> Figure:
    """One row per image: the image, then per block its kept tokens (dropped ones greyed), or
    the whole image greyed when the block is skipped, with the active heads written under it.

    Args:
        images: (B, H, W, 3) pixels in [0, 1].
        maps: ``tokens`` (B, L, rows, cols) bool, optionally ``blocks`` (B, L) and ``heads``
            (B, L, H) bool.
        captions: per image (text, colour).
        title: figure title.
    """
    tokens = maps["tokens"]
    B, L, g_rows, g_cols = tokens.shape
    blocks = maps.get("blocks", torch.ones(B, L, dtype=torch.bool))
    heads = maps.get("heads")
    figure = Figure(figsize=(CELL_INCHES * 0.8 * (L + 1), CELL_INCHES * 0.95 * B + 0.5), layout="constrained")
    axes = figure.subplots(B, L + 1, squeeze=False)
    figure.suptitle(title, fontsize=8)
    height, width = images.shape[1:3]
    # pixel → patch index (nearest, also when the image side is not a multiple of the grid)
    rows, cols = np.arange(height) * g_rows // height, np.arange(width) * g_cols // width
    for i, image in enumerate(images):
        axes[i, 0].imshow(image, interpolation="nearest")
        axes[i, 0].set_title(captions[i][0], fontsize=6, color=captions[i][1])
        for l in range(L):
            ax = axes[i, l + 1]
            executed = bool(blocks[i, l])
            kept = tokens[i, l].numpy()[rows][:, cols] if executed else np.zeros((height, width), bool)
            shown = np.where(kept[..., None], image, GREY_WEIGHT * GREY + (1 - GREY_WEIGHT) * image)
            ax.imshow(shown, interpolation="nearest")
            if executed:
                note = f"{int(tokens[i, l].sum())}/{g_rows * g_cols} tok"
                if heads is not None:
                    note += f"\n{int(heads[i, l].sum())}/{heads.shape[-1]} heads"
            else:
                note = "skipped"
            ax.set_xlabel(note, fontsize=6)
            if i == 0:
                ax.set_title(f"block {l}", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([]), ax.set_yticks([])
    return figure
