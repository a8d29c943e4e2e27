"""`ExitPolicy`: the one owner of the exit thresholds a network answers with.

Thresholds come from, in this order of precedence:

1. given by hand (`thresholds`, one per exit but the last);
2. a calibrated budget named by the user (`budget`);
3. the calibrated budget the calibration callback chose (`default_budget`);
4. none of them: the network's current thresholds stay (e.g. a checkpoint's, which travel in the
   network's `exit_thresholds` buffer; +inf, every image to the last exit, when never set).

The calibrations (budget name → thresholds and what they reached on the validation images) are
set by the `ThresholdCalibration` callback and travel in every checkpoint. No Lightning here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from adaptive_vit.methods.network import AdaptiveNetwork


class ExitPolicy:
    """Which thresholds `net` uses (see the module docstring for the precedence).

    Args:
        net: the network whose `exit_thresholds` this policy sets.
        thresholds: thresholds given by hand, each a max-softmax confidence in [0, 1] (or inf:
            no image stops at that exit).
        budget: the name of a calibrated budget to answer with.
    """

    def __init__(self, net: AdaptiveNetwork, thresholds: Sequence[float] | None = None,
                 budget: str | None = None) -> None:
        if thresholds is not None:
            bad = [t for t in thresholds if not 0.0 <= t <= 1.0 and t != math.inf]
            if bad:
                raise ValueError(
                    f"thresholds {list(thresholds)}: {bad} outside [0, 1]. A threshold is the max-softmax "
                    "confidence at which an image stops at that exit (0: every image stops, inf: none "
                    "does); give one value in [0, 1] (or .inf) per exit but the last."
                )
            net.set_thresholds(thresholds)  # checks the count now, not at the first evaluation
        self.net = net
        self.thresholds = None if thresholds is None else list(thresholds)
        self.budget = budget
        self.default_budget: str | None = None
        # budget name -> {"thresholds": [...], "accuracy": ..., "gflops": ..., "kind": ..., ...}
        self.calibrations: dict[str, dict[str, Any]] = {}

    @property
    def selected(self) -> str | None:
        """The budget whose thresholds are in use (None: given by hand, or the network's own)."""
        return None if self.thresholds is not None else (self.budget or self.default_budget)

    def calibrated(self, calibrations: dict[str, dict[str, Any]], default_budget: str) -> None:
        """Take new calibrations (the callback's), and answer with `default_budget` unless the
        user chose thresholds or a budget."""
        self.calibrations = calibrations
        self.default_budget = default_budget
        self.apply()

    def apply(self, strict: bool = True) -> None:
        """Set the network's thresholds from the highest-precedence source.

        Args:
            strict: raise if the budget to use is not calibrated (else keep the thresholds).
        """
        if self.thresholds is not None:
            self.net.set_thresholds(self.thresholds)
            return
        name = self.selected
        if name is None:
            return
        if name in self.calibrations:
            self.net.set_thresholds(self.calibrations[name]["thresholds"])
        elif strict:
            raise ValueError(
                f"budget {name!r} is not calibrated in this model; calibrated budgets: "
                f"{sorted(self.calibrations) or 'none'}. Pick one of them, or calibrate it with the "
                "ThresholdCalibration callback (during `fit`, or `validate --ckpt_path ...`)."
            )
