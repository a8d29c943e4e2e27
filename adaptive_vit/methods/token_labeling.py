"""The token-labeling loss (Jiang et al. 2021), shared by every method that trains a backbone with a
token-labeling head (the static LV-ViT, CF-ViT over LV-ViT). No Lightning here.

Targets come from `adaptive_vit.data.token_labels` (`TokenLabeler`): (B, 1 + S², classes), the
class token's soft target, then every cell of the S×S token grid's, cropped, flipped, smoothed and
MixToken-mixed with the image. The loss is the authors' `TokenLabelCrossEntropy`
(TokenLabeling `tlt/loss/cross_entropy.py`): soft-target CE of the class head against the class
token's target (`loss_cls`), and soft-target CE of the token head against each cell's target,
averaged over images and cells (`loss_aux`); the caller weighs them (theirs: cls_weight ·
loss_cls + dense_weight · loss_aux, both weights 1.0 by default in their `main.py`, and the
LV-ViT-S command of their README does not change them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class TokenLabelingLoss(NamedTuple):
    cls: Tensor  # soft-target CE of the class head against the class token's target
    token: Tensor  # soft-target CE of the token head, mean over images and grid cells


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of −Σ target · log_softmax(logits) (timm's and the authors' SoftTargetCrossEntropy).

    Args:
        logits: (..., classes).
        target: (..., classes), each row a distribution.
    """
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def token_labeling_loss(class_logits: Tensor, token_logits: Tensor | None, target: Tensor,
                        backbone: str, grid_hint: str = "") -> TokenLabelingLoss:
    """The two terms of the token-labeling loss (see the module docstring).

    Args:
        class_logits: (B, classes) the class head.
        token_logits: (B, S², classes) the token head on the target's token grid (row-major); None
            for a backbone without one (an error naming the fix).
        target: (B, 1 + S², classes) the class token's target, then every grid cell's.
        backbone: the backbone's name, for messages.
        grid_hint: how the network's token grid follows from its configuration, for messages
            (e.g. "img_size / patch_size").
    """
    if token_logits is None:
        raise ValueError(f"token labels need a backbone with a token-labeling head (e.g. lvvit_s); {backbone!r} "
                         "has none. Remove data.init_args.token_labels, or choose such a backbone.")
    if token_logits.shape[1] != target.shape[1] - 1:
        grid = math.isqrt(token_logits.shape[1])
        raise ValueError(
            f"token labels on a {math.isqrt(target.shape[1] - 1)}² grid, but the network's token head has "
            f"{token_logits.shape[1]} tokens: set data.init_args.token_label_grid to {grid}"
            + (f" ({grid_hint})." if grid_hint else ".")
        )
    return TokenLabelingLoss(soft_target_cross_entropy(class_logits, target[:, 0]),
                             soft_target_cross_entropy(token_logits, target[:, 1:]))
