"""The contract between a method's network and the rest of the tool, and the static baseline.

Every network (`StaticViT`, `CFViT`, `DVT`, `MIAFormer`) is a plain `nn.Module` (no Lightning)
subclassing `AdaptiveNetwork`:

- `forward(x)` → logits of the adaptive prediction at the network's current `exit_thresholds`
  (one tensor, so torchattacks and `predict` work unchanged);
- `forward_train(x)` → whatever the method's loss needs;
- `forward_adaptive(x, thresholds)` → `AdaptiveOutput`: logits, the exit that answered and the
  GFLOPs executed, per image, skipping work for real;
- `forward_exits(x)` → every exit's logits (for calibration and "anytime" accuracy);
- `exit_gflops()` → static cumulative GFLOPs per exit; `static_gflops()` → the plain backbone.

Thresholds live in a buffer, so they travel in every checkpoint and state_dict. An image answers
at the first exit k < K-1 whose max softmax is >= threshold k; the last exit always answers. The
default (+inf) sends every image to the last exit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from adaptive_vit.backbones import BackboneSpec, TrainHeads, build_backbone, family_of


class AdaptiveOutput(NamedTuple):
    logits: Tensor  # (B, C) the answer of the exit that answered
    exit_index: Tensor  # (B,) long, 0-based exit that answered
    gflops: Tensor  # (B,) GFLOPs executed for each image
    # optional per-image decision statistics, e.g. {"blocks": (B, L) kept fraction} for skippers
    decisions: dict[str, Tensor] | None = None


class AdaptiveNetwork(nn.Module):
    """Base of every method's network; see the module docstring for the contract."""

    exit_names: tuple[str, ...] = ("final",)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "exit_thresholds", torch.full((len(self.exit_names) - 1,), math.inf), persistent=True
        )

    @property
    def num_exits(self) -> int:
        return len(self.exit_names)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        if len(thresholds) != self.num_exits - 1:
            raise ValueError(
                f"{type(self).__name__} has {self.num_exits} exits ({', '.join(self.exit_names)}): "
                f"it takes {self.num_exits - 1} threshold(s), got {list(thresholds)}."
            )
        self.exit_thresholds.copy_(torch.as_tensor(list(thresholds), dtype=torch.float))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_adaptive(x, self.exit_thresholds.tolist()).logits

    def forward_train(self, x: Tensor) -> Any:
        raise NotImplementedError

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward_adaptive(self, x: Tensor, thresholds: Sequence[float]) -> AdaptiveOutput:
        raise NotImplementedError

    def decision_maps(self, x: Tensor) -> dict[str, Tensor]:
        """What the network decided for each image, for visualisation (`VisualizeDecisions`):
        spatial masks on its patch grids, e.g. CF-ViT's re-split regions or MIA-Former's kept
        tokens per block. The exit that answered is in `forward_adaptive`'s output. Default: none.
        """
        return {}

    def exit_gflops(self) -> list[float]:
        """Cumulative GFLOPs per image to answer at each exit (extra modules included)."""
        raise NotImplementedError

    def static_gflops(self) -> float:
        """GFLOPs per image of the plain backbone this method is judged against."""
        raise NotImplementedError

    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        raise NotImplementedError

    def static_baseline(self) -> nn.Module:
        """The plain backbone this method is judged against, for `adaptive-vit benchmark`."""
        raise NotImplementedError

    def benchmark_modes(self, x: Tensor) -> Iterator[tuple[str, Callable[[], AdaptiveOutput]]]:
        """Adaptive settings to time on `x`: (label, run) pairs.

        Default for multi-exit networks: thresholds that send a fraction f of the images past
        the first exit (to the last one), read off this batch's first-exit confidences.
        Methods override this to add their own settings (e.g. fixed skipping patterns).
        """
        if self.num_exits == 1:
            yield "adaptive", lambda: self.forward_adaptive(x, [])
            return
        confidence = self.forward_exits(x)[0].softmax(-1).amax(-1)
        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            thresholds = [fraction_threshold(confidence, fraction)] + [math.inf] * (self.num_exits - 2)
            yield f"{fraction:.0%} past exit 1", lambda t=thresholds: self.forward_adaptive(x, t)


def fraction_threshold(confidence: Tensor, fraction: float) -> float:
    """A threshold that lets `fraction` of the images (those least confident) go on."""
    ordered = confidence.sort().values  # ascending
    count = round(fraction * len(ordered))
    if count >= len(ordered):
        return math.inf
    return float(ordered[count])  # images with confidence >= this one stop


class StaticViT(AdaptiveNetwork):
    """The plain backbone as a one-exit network: the baseline every method is judged by.

    Args:
        backbone: a model of a registered backbone family (`adaptive_vit.backbones`).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.family = family_of(backbone)

    @classmethod
    def from_spec(cls, spec: BackboneSpec, num_classes: int) -> StaticViT:
        return cls(build_backbone(spec, num_classes)[0])

    def forward_train(self, x: Tensor) -> TrainHeads:
        """The prediction and, for a backbone with a token-labeling head, both heads apart."""
        return self.family.train_heads(self.backbone, x)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self.backbone(x)]

    def forward_adaptive(self, x: Tensor, thresholds: Sequence[float] = ()) -> AdaptiveOutput:
        logits = self.backbone(x)
        cost = torch.full((x.shape[0],), self.exit_gflops()[0], dtype=torch.float32, device=x.device)
        return AdaptiveOutput(logits, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), cost)

    def exit_gflops(self) -> list[float]:
        return [self.family.gflops(self.backbone)]

    def static_gflops(self) -> float:
        return self.exit_gflops()[0]

    def static_baseline(self) -> nn.Module:
        return self.backbone

    def input_size(self) -> tuple[int, int, int]:
        return self.family.input_size(self.backbone)
