"""`FlopsBudgetTracker`: how much compute the model really spends, per epoch, against a target.

It reads the per-image step outputs of `AdaptiveLitModule`: ``gflops`` (B,) executed per image,
``exit_index`` (B,) and, for models that skip work, ``decisions`` {"blocks"|"heads"|"tokens":
(B, L) fraction kept per block}. A training step may return the same (``gflops`` and
``decisions/<kind>`` tensors in its output dict); without them, a training forward counts as the
full network (the last exit's cumulative cost). Everything is summed on each rank and reduced
across ranks at the end of the epoch. The sums of an epoch in progress and the rows so far are
saved in checkpoints, so a fit resumed mid-epoch (``--ckpt_path last``) reports whole epochs and
keeps the earlier rows of ``flops_budget.csv``.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor


class FlopsBudgetTracker(Callback):
    """Log mean executed GFLOPs, ratio to the backbone, exit fractions and skip ratios per epoch.

    Logged per stage (``train``, ``val``, ``test``): ``<stage>/flops/gflops`` (mean GFLOPs per
    image), ``<stage>/flops/ratio`` (to the static backbone's GFLOPs), ``<stage>/flops/exit_<name>``
    (fraction of images answering there, multi-exit models), ``<stage>/flops/skip_<kind>`` (mean
    fraction of blocks, heads or tokens skipped) and, with `per_block`, ``skip_<kind>_<l>`` per
    block. Rows of the same figures, with the number of images they average over (summed over
    DDP ranks), go to ``flops_budget.csv`` in the log folder.

    Args:
        target_gflops: mean GFLOPs per image the evaluated model should stay within (None: the
            model's own `target_gflops` if it has one, as MIA-Former does, else no check).
        tolerance: relative slack over the target before it counts as exceeded (0.05 = 5 %).
        stop_on_exceed: stop training when a validation epoch exceeds the target (else warn only).
        per_block: also log each block's skip ratio (the CSV always has them).
    """

    def __init__(
        self,
        target_gflops: float | None = None,
        tolerance: float = 0.05,
        stop_on_exceed: bool = False,
        per_block: bool = False,
    ) -> None:
        if target_gflops is not None and target_gflops <= 0:
            raise ValueError(
                f"FlopsBudgetTracker: target_gflops must be positive, got {target_gflops}: the mean GFLOPs per "
                "image to stay within (`adaptive-vit flops --config ...` reports the model's), or null for none."
            )
        if tolerance < 0:
            raise ValueError(f"FlopsBudgetTracker: tolerance must be >= 0, got {tolerance}")
        self.target_gflops = target_gflops
        self.tolerance = tolerance
        self.stop_on_exceed = stop_on_exceed
        self.per_block = per_block
        self.rows: list[dict[str, Any]] = []
        self._sums: dict[str, dict[str, Tensor]] = {"train": {}, "val": {}, "test": {}}
        self._strategy: Strategy | None = None
        self._fitting = False

    # ------------------------------------------------------------------ checkpoint state

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._strategy = trainer.strategy
        self._fitting = stage == "fit"
        if self.target_gflops is None:  # one source for the target: the model's, if it has one
            self.target_gflops = getattr(pl_module.hparams, "target_gflops", None)

    def state_dict(self) -> dict[str, Any]:
        """The CSV rows so far and the running sums, reduced over ranks (every rank saves a
        checkpoint, rank 0 writes it; the reduction is in place, hence the copies)."""
        sums = {
            stage: {k: self._strategy.reduce(v.clone(), reduce_op="sum").cpu() for k, v in sorted(stage_sums.items())}
            for stage, stage_sums in self._sums.items() if stage_sums  # sums exist after setup only
        }
        return {"rows": list(self.rows), "sums": sums}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed fit goes on from the saved rows and sums: rank 0 from the sums (of all
        ranks), the others from zero, so the sums reduced at the end of the epoch count every image
        once. Evaluating a checkpoint (test, validate) starts afresh."""
        if not self._fitting:
            return
        self.rows = list(state_dict["rows"])
        self._sums = {stage: {} for stage in self._sums}
        if rank_zero_only.rank == 0:  # saved on the CPU: back to where the new sums accumulate
            device = self._strategy.root_device
            self._sums.update({stage: {k: v.to(device) for k, v in sums.items()}
                               for stage, sums in state_dict["sums"].items()})

    # ------------------------------------------------------------------ accumulating

    def _update(
        self, stage: str, pl_module: LightningModule, outputs: Any, batch_size: int, default_gflops: float | None
    ) -> None:
        sums = self._sums[stage]

        def add(name: str, value: Tensor) -> None:
            value = value.detach().double()
            sums[name] = sums[name] + value if name in sums else value

        outputs = outputs if isinstance(outputs, dict) else {}
        device = pl_module.device
        gflops = outputs.get("gflops")
        if not isinstance(gflops, Tensor) or gflops.ndim != 1:
            if default_gflops is None:
                return
            gflops = torch.full((batch_size,), default_gflops, device=device)
        add("count", torch.tensor(float(len(gflops)), device=device))
        add("gflops", gflops.sum())
        exit_index = outputs.get("exit_index")
        if isinstance(exit_index, Tensor):
            add("exits", torch.bincount(exit_index, minlength=pl_module.net.num_exits).to(device))
        decisions = dict(outputs.get("decisions") or {})
        decisions.update({k.split("/", 1)[1]: v for k, v in outputs.items() if k.startswith("decisions/")})
        for kind, kept in decisions.items():  # kept: (B, L) fraction kept per block
            add(f"kept_{kind}", kept.float().sum(0))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums["train"] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Without per-image figures, a training forward runs the whole network.
        self._update("train", pl_module, outputs, len(batch[0]), pl_module.net.exit_gflops()[-1])

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums["val"] = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", pl_module, outputs, len(batch[0]), None)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums["test"] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", pl_module, outputs, len(batch[0]), None)

    # ------------------------------------------------------------------ epoch ends

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            row = self._finish(trainer, pl_module, "val")
            if row:
                self._check_target(trainer, row)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        row = self._finish(trainer, pl_module, "test")
        if row:
            self._check_target(trainer, row)

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, Any] | None:
        """Reduce the epoch's sums over ranks, log them, append a CSV row (rank 0 writes)."""
        sums = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sorted(self._sums[stage].items())}
        self._sums[stage] = {}
        log_dir = trainer.log_dir  # a collective call: every rank asks
        if not sums or sums["count"].item() == 0:
            return None
        net = pl_module.net
        count = sums["count"]
        static = net.static_gflops()
        row: dict[str, Any] = {
            "epoch": trainer.current_epoch, "stage": stage, "images": int(count.item()),
            "gflops": (sums["gflops"] / count).item(), "static_gflops": static,
        }
        row["ratio"] = row["gflops"] / static
        row["target_gflops"] = self.target_gflops
        if "exits" in sums:
            fractions = (sums["exits"] / count).tolist()
            row.update({f"exit_{name}": f for name, f in zip(net.exit_names, fractions)})
        for key, kept in sums.items():
            if key.startswith("kept_"):
                skipped = (1 - kept / count).tolist()  # (L,)
                row[f"skip_{key[5:]}"] = sum(skipped) / len(skipped)
                row.update({f"skip_{key[5:]}_{l}": s for l, s in enumerate(skipped)})
        for key, value in row.items():
            if key in ("epoch", "stage", "images", "static_gflops", "target_gflops"):
                continue
            is_block = key.startswith("skip_") and key.rsplit("_", 1)[1].isdigit()
            if key.startswith("exit_") and net.num_exits == 1 or is_block and not self.per_block:
                continue
            pl_module.log(f"{stage}/flops/{key}", value, sync_dist=False)  # already reduced over ranks
        self.rows.append(row)
        if trainer.is_global_zero and log_dir:
            os.makedirs(log_dir, exist_ok=True)
            fields = list(dict.fromkeys(k for r in self.rows for k in r))
            with open(os.path.join(log_dir, "flops_budget.csv"), "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)
        return row

    def _check_target(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.target_gflops is None or row["gflops"] <= self.target_gflops * (1 + self.tolerance):
            return
        over = row["gflops"] / self.target_gflops - 1
        stopping = self.stop_on_exceed and trainer.state.fn == "fit"
        rank_zero_warn(
            f"FlopsBudgetTracker: {row['stage']} mean {row['gflops']:.4g} GFLOPs per image exceeds the "
            f"target {self.target_gflops:.4g} by {over:.1%} (tolerance {self.tolerance:.1%})"
            + ("; stopping training (stop_on_exceed: true)." if stopping else
               ". Lower the thresholds / raise the model's sparsity target, or raise target_gflops.")
        )
        if stopping:
            trainer.should_stop = True
