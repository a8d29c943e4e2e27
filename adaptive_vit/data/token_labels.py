"""Token labeling (Jiang et al. 2021): dense per-location class scores from a machine annotator as
training targets of every patch token, cropped, flipped and mixed together with the image.

Label maps, the TokenLabeling release's format: one file per training image,
``<label_root>/<class folder>/<image file name without extension>.pt``, holding a tensor
(2, k, h, w): ``[0]`` the annotator's top-k scores at each of its h×w locations, ``[1]`` their
class indices (stored as numbers). Their released ImageNet maps are k = 5, h = w = 15.

Per training image (`TokenLabelImages`, in the loader's workers): the image's RandomResizedCrop box
and horizontal flip are drawn once and recorded beside the label map; the rest of the training
transform (RandAugment, normalisation, erasing) runs on the image alone. Per batch, on the device
(`TokenLabeler`): the top-k scores are spread into a (classes, h, w) map, the crop box is cut out
of it and resampled to the token grid (``roi_align``, and the whole box to one cell for the
class token), softmaxed over classes, flipped with the image, label-smoothed; then MixToken.

Deviations from the authors' code, each for the reason given:
- MixToken mixes the images inside a box aligned with the token grid (and the targets inside the
  same box), where theirs mixes the patch embeddings: the image-level mix keeps mixing in the data
  module for every backbone and method; the two differ only in the stem's receptive field along
  the box border. Their CF-ViT draws the box on the coarse grid and doubles it for the fine one;
  this box is drawn on the target grid (CF-ViT: the fine one), so it may cut a coarse token.
- RandAugment's geometric operations (rotate, shear, translate) are not mirrored onto the label
  maps (theirs are); their magnitudes at m = 9 move the content by a fraction of a token.
- Label smoothing ε gives targets · (1 − ε) + ε / classes, which sums to 1 (theirs,
  targets · (1 − ε + ε/classes) + ε/classes, sums to 1 + ε).
- The crop box enters ``roi_align`` as (x1, y1, x2, y2) = (left, top, right, bottom) of the map's
  (h rows, w columns). Their `get_labelmaps_with_coords` passes (top, left, bottom, right) in that
  slot, which agrees only if their stored maps are transposed; not checked against their files.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.ops import roi_align
from torchvision.transforms import Compose, RandomHorizontalFlip
from torchvision.transforms import functional as TF

from adaptive_vit.data.images import ImageModeError, UnreadableImageWarning, load_rgb

TokenTarget = tuple[Tensor, Tensor, Tensor]  # label (), label map (2, k, h, w), box (5,)


def label_map_path(label_root: str | Path, image_path: str) -> Path:
    """``<label_root>/<class folder>/<file name without extension>.pt`` of an image."""
    folder, name = os.path.split(image_path)
    return Path(label_root) / os.path.basename(folder) / (os.path.splitext(name)[0] + ".pt")


class TokenLabelImages(Dataset):
    """Training images with their label maps and the crop box and flip they were given.

    Items: ``(image, (label, label_map, box))`` with box = (top, left, bottom, right, flipped)
    as fractions of the image (flipped 0 or 1); None for an unreadable image or label map.

    Args:
        samples: ``(image path, label)`` pairs (a class-folder training split).
        label_root: the folder of the label maps.
        transform: the training transform (a ``Compose`` whose first step is timm's
            RandomResizedCrop, then an optional RandomHorizontalFlip, then the rest).
    """

    def __init__(self, samples: list[tuple[str, int]], label_root: str | Path, transform: Compose) -> None:
        self.samples, self.label_root = samples, Path(label_root)
        self.targets = [label for _, label in samples]
        steps = list(transform.transforms)
        self.crop = steps.pop(0)
        self.flip = steps.pop(0).p if steps and isinstance(steps[0], RandomHorizontalFlip) else 0.0
        self.rest = Compose(steps)
        missing = [p for p, _ in samples[:1] if not label_map_path(label_root, p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"token labels: no label map {label_map_path(label_root, missing[0])} for {missing[0]}; "
                "expected <token_labels>/<class folder>/<image name>.pt, a (2, k, h, w) tensor of "
                "top-k scores and class indices (the TokenLabeling release's format)."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, TokenTarget] | None:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
            label_map = torch.load(label_map_path(self.label_root, path), map_location="cpu", weights_only=True)
        except (OSError, ImageModeError, RuntimeError, pickle.UnpicklingError) as error:  # the last two: a damaged .pt
            warnings.warn(f"skipping training image {path} or its label map ({error})", UnreadableImageWarning,
                          stacklevel=2)
            return None  # replaced by the next readable sample (`TrainingSamples`)
        full_width, full_height = image.size
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):  # timm's "random": one of several
            interpolation = interpolation[int(torch.randint(len(interpolation), ()))]
        image = TF.resized_crop(image, top, left, height, width, list(self.crop.size), interpolation)
        flipped = bool(torch.rand(()) < self.flip)
        if flipped:
            image = TF.hflip(image)
        box = torch.tensor([top / full_height, left / full_width, (top + height) / full_height,
                            (left + width) / full_width, float(flipped)])
        return self.rest(image), (torch.tensor(label), label_map.float(), box)


def with_token_labels(dataset: Dataset, label_root: str | Path, transform: Compose) -> TokenLabelImages:
    """The training split `dataset` (class folders: ``imagenet``, ``folder``) with its label maps.

    Args:
        dataset: the training split as its source built it (it must list its ``samples``).
        label_root: the folder of the label maps.
        transform: the training transform.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ValueError(
            f"token labels need a class-folder training set (dataset imagenet or folder, val_split 0), "
            f"not {type(dataset).__name__}: the label maps are found by each image's folder and file name."
        )
    return TokenLabelImages(samples, label_root, transform)


def dense_targets(label_maps: Tensor, boxes: Tensor, grid: int, num_classes: int) -> Tensor:
    """Targets of the class token and every token of a grid×grid map: (B, 1 + grid², classes).

    The top-k scores are spread into a (classes, h, w) map, the image's crop box is cut out of it
    and resampled (``roi_align``: to grid×grid for the tokens, to one cell for the class token),
    softmaxed over the classes, and flipped with the image (the authors' ``get_label``).

    Args:
        label_maps: (B, 2, k, h, w) top-k scores and class indices.
        boxes: (B, 5) crop box (top, left, bottom, right) as fractions of the image, and flipped.
        grid: tokens per side.
        num_classes: classes.
    """
    B, _, _, h, w = label_maps.shape
    scores = label_maps.new_zeros(B, num_classes, h, w)
    scores.scatter_(1, label_maps[:, 1].long(), label_maps[:, 0])
    scale = boxes.new_tensor([w, h, w, h])
    rois = torch.cat([torch.arange(B, device=boxes.device, dtype=boxes.dtype)[:, None],
                      boxes[:, [1, 0, 3, 2]] * scale - 0.5], 1)  # (index, x1, y1, x2, y2) in map cells
    tokens = roi_align(scores, rois, (grid, grid))  # (B, C, grid, grid)
    flipped = boxes[:, 4] > 0.5
    tokens = torch.where(flipped[:, None, None, None], tokens.flip(-1), tokens)
    whole = roi_align(scores, rois, (1, 1))  # (B, C, 1, 1)
    return torch.cat([whole.flatten(2), tokens.flatten(2)], 2).transpose(1, 2).softmax(-1)


class TokenLabeler:
    """A training batch with label maps → (images, targets (B, 1 + grid², classes)), label
    smoothing and MixToken (see the module docstring).

    Args:
        num_classes: classes.
        grid: token grid side of the targets (the network's finest: 14 for 224 images with
            16-pixel patches, CF-ViT's fine grid 2·coarse_grid).
        smoothing: label smoothing ε: targets · (1 − ε) + ε / classes.
        mix_token: MixToken on (the authors': always, box area ~ U(0, 1)).
    """

    def __init__(self, num_classes: int, grid: int, smoothing: float = 0.0, mix_token: bool = True) -> None:
        self.num_classes, self.grid, self.smoothing, self.mix_token = num_classes, grid, smoothing, mix_token

    def __call__(self, images: Tensor, target: TokenTarget) -> tuple[Tensor, Tensor]:
        _, label_maps, boxes = target
        targets = dense_targets(label_maps.float(), boxes.float(), self.grid, self.num_classes)
        targets = targets * (1 - self.smoothing) + self.smoothing / self.num_classes
        return self.mix(images, targets) if self.mix_token else (images, targets)

    def mix(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """MixToken: a box of the token grid (area 1 − λ, λ ~ Beta(1, 1)) taken from the batch in
        reverse order, in the images and in the token targets; the class token's target mixes by
        the box's real area."""
        g, side = self.grid, images.shape[-1] // self.grid
        cut = (1 - float(torch.rand(()))) ** 0.5  # λ ~ U(0, 1) = Beta(1, 1): side ratio √(1 − λ)
        size = int(g * cut)
        cy, cx = (int(v) for v in torch.randint(g, (2,)))
        y0, y1 = max(cy - size // 2, 0), min(cy + size // 2, g)
        x0, x1 = max(cx - size // 2, 0), min(cx + size // 2, g)
        images, targets = images.clone(), targets.clone()
        rows, cols = slice(y0 * side, y1 * side), slice(x0 * side, x1 * side)
        images[:, :, rows, cols] = images.flip(0)[:, :, rows, cols]
        grid = targets[:, 1:].unflatten(1, (g, g))
        grid[:, y0:y1, x0:x1] = grid.flip(0)[:, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (g * g)
        targets[:, 0] = lam * targets[:, 0] + (1 - lam) * targets.flip(0)[:, 0]
        return images, targets
