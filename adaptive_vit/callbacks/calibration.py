"""`ThresholdCalibration`: exit thresholds fitted to GFLOPs budgets on held-out images.

At the end of each validation epoch (while fitting, and on `adaptive-vit validate`) it gathers,
from every DDP rank, each validation image's per-exit confidence and correctness (the step
outputs of `AdaptiveLitModule`), drops the copies the distributed sampler padded, and solves
(`adaptive_vit.budget`) the thresholds of the most accurate early exit within each configured
budget. The results go into the module's `exit_policy`, which travels in every checkpoint saved
afterwards, and one of them (the `select`ed budget, or the model's `budget` hparam) becomes the
network's thresholds. The run's log folder gets `thresholds.json`, `budget_curve.csv` and
`budget_curve.png` (accuracy against mean GFLOPs).

At `test` it evaluates every stored budget's thresholds on the test images (thresholds fitted on
validation, evaluated on test: an honest curve) and writes `test_budget_curve.csv/.png`.

Only multi-exit networks have thresholds; on a one-exit network (the static baseline) the callback
says so once and does nothing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from adaptive_vit.budget import BudgetResult, budget_curve, evaluate_thresholds, solve_accuracy
from adaptive_vit.reports import json_safe, write_csv


class ThresholdCalibration(Callback):
    """Fit exit thresholds to GFLOPs budgets on the validation split; evaluate them at test.

    Budgets are named, and those names select thresholds at test
    (``--model.init_args.budget NAME``): ``gflops_<B>`` for an absolute budget B (mean GFLOPs per
    image), ``fraction_<f>`` for f times the last exit's cost, ``match_accuracy`` for the fewest
    GFLOPs reaching the last exit's accuracy, and ``curve_<i>`` for the points of the
    accuracy-GFLOPs curve.

    Args:
        budgets_gflops: absolute budgets, mean GFLOPs per image (each >= the first exit's cost).
        budget_fractions: budgets as fractions of the last exit's cumulative cost.
        match_accuracy: also calibrate the cheapest thresholds as accurate as the last exit
            (the backbone) on the calibration images.
        select: the budget whose thresholds the network uses after calibrating (the model's
            ``budget`` hparam, if set, wins). Default: the first configured one.
        curve_points: number of evenly spaced budgets of the accuracy-GFLOPs curve, from the
            first exit's cost to the last's.
        stages: when to calibrate: ``fit`` (every validation epoch, so each checkpoint carries
            thresholds fitted to its own weights) and/or ``validate``.
        save_checkpoint: after calibrating in ``validate``, save the model with its calibrations
            as ``calibrated.ckpt`` in the log folder (``test --ckpt_path`` it).
        plot: write the PNG plots (matplotlib).
    """

    def __init__(
        self,
        budgets_gflops: Sequence[float] = (),
        budget_fractions: Sequence[float] = (),
        match_accuracy: bool = True,
        select: str | None = None,
        curve_points: int = 20,
        stages: Sequence[str] = ("fit", "validate"),
        save_checkpoint: bool = True,
        plot: bool = True,
    ) -> None:
        unknown = set(stages) - {"fit", "validate"}
        if unknown:
            raise ValueError(f"ThresholdCalibration: stages must be among 'fit', 'validate'; got {sorted(unknown)}")
        if any(f <= 0 for f in budget_fractions):
            raise ValueError(f"ThresholdCalibration: budget_fractions must be positive, got {list(budget_fractions)}")
        self.targets: dict[str, tuple[str, float]] = {  # name -> (kind, value)
            **{f"gflops_{g:g}": ("gflops", float(g)) for g in budgets_gflops},
            **{f"fraction_{f:g}": ("fraction", float(f)) for f in budget_fractions},
            **({"match_accuracy": ("accuracy", math.nan)} if match_accuracy else {}),
        }
        if not self.targets:
            raise ValueError(
                "ThresholdCalibration: no budget configured; set budgets_gflops, budget_fractions "
                "or match_accuracy: true."
            )
        if select is not None and select not in self.targets:
            raise ValueError(f"ThresholdCalibration: select={select!r} is not a configured budget: {list(self.targets)}")
        self.select = select or next(iter(self.targets))
        self.curve_points = curve_points
        self.stages = tuple(stages)
        self.save_checkpoint = save_checkpoint
        self.plot = plot
        self._collector: SampleCollector | None = None

    # ------------------------------------------------------------------ checks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        net = pl_module.net
        if net.num_exits == 1:
            rank_zero_info(f"ThresholdCalibration: {type(net).__name__} has a single exit, nothing to calibrate.")
            return
        budget = pl_module.exit_policy.budget
        names = [*self.targets, *(f"curve_{i:02d}" for i in range(self.curve_points))]
        if stage in self.stages and budget and budget not in names:
            raise ValueError(
                f"the model's budget {budget!r} is not one ThresholdCalibration calibrates "
                f"({', '.join(self.targets)}, curve_00..curve_{self.curve_points - 1:02d}); "
                "add it to the callback's budgets or pick one of those."
            )
        exit_gflops = net.exit_gflops()
        for name, (kind, value) in self.targets.items():
            gflops = self._budget(kind, value, exit_gflops)
            if gflops is not None and gflops < exit_gflops[0] * (1 - 1e-9):
                raise ValueError(
                    f"ThresholdCalibration: budget {name} = {gflops:g} GFLOPs is below the cheapest "
                    f"possible cost of {type(net).__name__}, {exit_gflops[0]:g} GFLOPs (every image at "
                    f"exit {net.exit_names[0]!r}, i.e. fraction {exit_gflops[0] / exit_gflops[-1]:.3g} of "
                    "the last exit); raise it to at least that."
                )

    @staticmethod
    def _budget(kind: str, value: float, exit_gflops: Sequence[float]) -> float | None:
        return {"gflops": value, "fraction": value * exit_gflops[-1]}.get(kind)

    # ------------------------------------------------------------------ collecting

    def _active(self, trainer: Trainer, pl_module: LightningModule, testing: bool = False) -> bool:
        if pl_module.net.num_exits == 1 or trainer.sanity_checking:
            return False
        return testing or trainer.state.fn in self.stages

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active(trainer, pl_module):
            self._collector = SampleCollector(trainer.val_dataloaders)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active(trainer, pl_module, testing=True):
            self._collector = SampleCollector(trainer.test_dataloaders)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._collector is not None and dataloader_idx == 0:
            self._collector.add(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    # ------------------------------------------------------------------ calibrating

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collector is None:
            return
        samples, self._collector = self._collector.gather(pl_module), None
        net = pl_module.net
        exit_gflops = net.exit_gflops()
        confidences, correct = samples["confidences"].cpu(), samples["correct"].cpu()
        names = list(self.targets)
        budgets = [self._budget(*self.targets[n], exit_gflops) for n in names if self.targets[n][0] != "accuracy"]
        curve_budgets = torch.linspace(exit_gflops[0], exit_gflops[-1], self.curve_points, dtype=torch.float64).tolist()
        solved = iter(budget_curve(confidences, correct, exit_gflops, budgets=budgets + curve_budgets))
        results: dict[str, tuple[str, float, BudgetResult]] = {}
        for name in names:
            kind, value = self.targets[name]
            if kind == "accuracy":
                value = correct[:, -1].sum().item() / len(correct)  # exact (a float32 mean can overshoot)
                results[name] = (kind, value, solve_accuracy(confidences, correct, exit_gflops, value))
            else:
                results[name] = (kind, value, next(solved))
        for i, gflops in enumerate(curve_budgets):
            results[f"curve_{i:02d}"] = ("curve", gflops, next(solved))

        pl_module.exit_policy.calibrated({
            name: {**result.to_dict(), "kind": kind, "target": value, "exit_gflops": list(exit_gflops),
                   "num_images": len(confidences)}
            for name, (kind, value, result) in results.items()
        }, default_budget=self.select)
        for name, (kind, _, result) in results.items():
            if kind != "curve":
                pl_module.log(f"val/budget/{name}/top1", result.accuracy, sync_dist=True)
                pl_module.log(f"val/budget/{name}/gflops", result.gflops, sync_dist=True)

        log_dir = trainer.log_dir  # a collective call: every rank asks
        if trainer.is_global_zero and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._write_json(os.path.join(log_dir, "thresholds.json"), pl_module)
            rows = [_row(name, kind, value, result) for name, (kind, value, result) in results.items()]
            write_csv(os.path.join(log_dir, "budget_curve.csv"), rows)
            if self.plot:
                exit_points = _exit_points(correct, exit_gflops, net.exit_names)
                _plot(os.path.join(log_dir, "budget_curve.png"), rows, exit_points,
                      f"{type(net).__name__}: thresholds on {len(confidences)} validation images")
        if trainer.state.fn == "validate" and self.save_checkpoint and log_dir:
            path = os.path.join(log_dir, "calibrated.ckpt")
            trainer.save_checkpoint(path, weights_only=True)
            rank_zero_info(f"ThresholdCalibration: saved {path}; evaluate it with `adaptive-vit test --ckpt_path {path}`.")

    def _write_json(self, path: str, pl_module: LightningModule) -> None:
        net = pl_module.net
        calibrations = pl_module.exit_policy.calibrations
        report = {
            "model": type(net).__name__,
            "exit_names": list(net.exit_names),
            "exit_gflops": net.exit_gflops(),
            "static_gflops": net.static_gflops(),
            "selected": pl_module.exit_policy.selected,
            "thresholds_in_use": net.exit_thresholds.tolist(),
            "note": "null threshold: no image answers at that exit",
            "budgets": {n: c for n, c in calibrations.items() if c["kind"] != "curve"},
            "curve": [c for c in calibrations.values() if c["kind"] == "curve"],
        }
        with open(path, "w") as file:
            json.dump(json_safe(report), file, indent=2)

    # ------------------------------------------------------------------ testing

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collector is None:
            return
        samples, self._collector = self._collector.gather(pl_module), None
        if not pl_module.exit_policy.calibrations:
            rank_zero_warn(
                "ThresholdCalibration: this model has no calibrated budgets, so no test budget curve. "
                "Calibrate during `fit` or with `adaptive-vit validate --ckpt_path ...`."
            )
            return
        net = pl_module.net
        exit_gflops = net.exit_gflops()
        confidences, correct = samples["confidences"].cpu(), samples["correct"].cpu()
        rows = []
        for name, calibration in pl_module.exit_policy.calibrations.items():
            result = evaluate_thresholds(confidences, correct, exit_gflops, calibration["thresholds"])
            row = _row(name, calibration["kind"], calibration["target"], result)
            row.update({"val_accuracy": calibration["accuracy"], "val_gflops": calibration["gflops"]})
            rows.append(row)
            if calibration["kind"] != "curve":
                pl_module.log(f"test/budget/{name}/top1", result.accuracy, sync_dist=True)
                pl_module.log(f"test/budget/{name}/gflops", result.gflops, sync_dist=True)
        log_dir = trainer.log_dir
        if trainer.is_global_zero and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            write_csv(os.path.join(log_dir, "test_budget_curve.csv"), rows)
            if self.plot:
                _plot(os.path.join(log_dir, "test_budget_curve.png"), rows,
                      _exit_points(correct, exit_gflops, net.exit_names),
                      f"{type(net).__name__}: validation thresholds on {len(confidences)} test images")


class SampleCollector:
    """One evaluation epoch's per-image step outputs, each tagged with its dataset index.

    The index is read off the loader's batch sampler (the DistributedSampler under DDP), in the
    order the batches arrive; `gather` collects every rank's images and keeps one copy of each
    index, so the images the sampler repeated to even out the ranks count once, and the result
    (sorted by index) is the same whatever the number of processes.

    Args:
        dataloaders: the stage's loader (or list of loaders: the first one is collected).
        keys: the per-image step outputs to keep.
    """

    def __init__(self, dataloaders: Any, keys: Sequence[str] = ("confidences", "correct")) -> None:
        loader = dataloaders[0] if isinstance(dataloaders, (list, tuple)) else dataloaders
        if getattr(loader, "batch_sampler", None) is None:
            raise ValueError(
                "ThresholdCalibration needs a map-style evaluation dataset with a batch sampler "
                "(to tell which images each process saw); got an iterable-style loader."
            )
        self.order = list(itertools.chain.from_iterable(loader.batch_sampler))
        self.keys = tuple(keys)
        self.parts: dict[str, list[Tensor]] = {key: [] for key in self.keys}
        self.seen = 0

    def add(self, outputs: dict[str, Tensor]) -> None:
        for key in self.keys:
            self.parts[key].append(outputs[key].detach())
        self.seen += len(outputs[self.keys[0]])

    def gather(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """Every rank's images, one per dataset index, sorted by index (a collective call)."""
        device = pl_module.device
        local = {key: torch.cat(parts).to(device) for key, parts in self.parts.items()}
        local["index"] = torch.as_tensor(self.order[: self.seen], dtype=torch.long, device=device)
        if pl_module.trainer.world_size > 1:
            local = _all_gather_ragged(pl_module, local)
        unique, inverse = local["index"].unique(sorted=True, return_inverse=True)
        first = torch.full_like(unique, len(inverse)).scatter_reduce(
            0, inverse, torch.arange(len(inverse), device=device), "amin"
        )  # first occurrence of each index
        return {key: value[first] for key, value in local.items()}


def _all_gather_ragged(pl_module: LightningModule, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """All ranks' tensors (same keys, first dimensions may differ), concatenated rank by rank."""
    count = len(next(iter(tensors.values())))
    counts = pl_module.all_gather(torch.tensor(count, device=pl_module.device)).tolist()  # (W,)
    size = max(counts)
    out = {}
    for key, value in tensors.items():
        padded = value.new_zeros((size, *value.shape[1:]), dtype=torch.uint8 if value.dtype == torch.bool else None)
        padded[:count] = value  # bool as uint8: not every backend gathers bool
        gathered = pl_module.all_gather(padded).to(value.dtype)  # (W, size, ...)
        out[key] = torch.cat([gathered[rank, :n] for rank, n in enumerate(counts)])
    return out


# ---------------------------------------------------------------------- files


def _row(name: str, kind: str, target: float, result: BudgetResult) -> dict[str, Any]:
    return {
        "name": name, "kind": kind, "target": target, "accuracy": result.accuracy, "gflops": result.gflops,
        "thresholds": " ".join(f"{t:.6g}" for t in result.thresholds),
        **{f"fraction_exit{k}": f for k, f in enumerate(result.exit_fractions)},
    }


def _exit_points(correct: Tensor, exit_gflops: Sequence[float], exit_names: Sequence[str]) -> list[tuple[str, float, float]]:
    """(name, GFLOPs, accuracy) of every image answering at the same exit."""
    accuracy = correct.float().mean(0).tolist()
    return [(name, g, a) for name, g, a in zip(exit_names, exit_gflops, accuracy)]


def _plot(path: str, rows: list[dict[str, Any]], exits: list[tuple[str, float, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sorted((r["gflops"], 100 * r["accuracy"]) for r in rows if r["kind"] == "curve")
    fig, ax = plt.subplots(figsize=(6, 4))
    if curve:
        ax.plot(*zip(*curve), "-o", ms=3, label="budget curve")
    for row in rows:
        if row["kind"] != "curve":
            ax.plot(row["gflops"], 100 * row["accuracy"], "*", ms=10, label=row["name"])
    ax.plot([e[1] for e in exits], [100 * e[2] for e in exits], "s", color="gray", label="single exits")
    for name, gflops, accuracy in exits:
        ax.annotate(name, (gflops, 100 * accuracy), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set(xlabel="mean GFLOPs per image", ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
