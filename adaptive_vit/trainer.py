"""`AdaptiveTrainer`: Lightning's Trainer plus the `flops` and `benchmark` subcommands.

LightningCLI turns a Trainer method's signature into a subcommand's arguments, so these two take
`--config` like `fit` does and read the same model section. Neither loads data.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, Trainer

from adaptive_vit.backbones import set_fused_attn
from adaptive_vit.flops import count_params
from adaptive_vit.checkpoints import load_run_checkpoint
from adaptive_vit.methods.base import AdaptiveLitModule


class AdaptiveTrainer(Trainer):
    """Lightning `Trainer` with `flops` and `benchmark`."""

    def flops(
        self,
        model: AdaptiveLitModule,
        datamodule: LightningDataModule | None = None,
        format: Literal["table", "json"] = "table",
    ) -> dict[str, Any]:
        """Parameters and per-exit GFLOPs per image of the configured model (no data loaded).

        Args:
            model: the configured LightningModule.
            datamodule: unused (the model's input size comes from its own configuration).
            format: ``table`` for people, ``json`` for scripts.
        """
        net = model.net.eval()
        cumulative = net.exit_gflops()
        exits = [
            {"name": name, "gflops": round(c - (cumulative[k - 1] if k else 0.0), 6),
             "cumulative_gflops": round(c, 6)}
            for k, (name, c) in enumerate(zip(net.exit_names, cumulative))
        ]
        report = {
            "model": type(net).__name__,
            "params_m": round(count_params(net) / 1e6, 4),
            "exits": exits,
            "static_gflops": round(net.static_gflops(), 6),
        }
        if format == "json":
            print(json.dumps(report, indent=2))
        else:
            print_table(
                f"{report['model']}: {report['params_m']:.2f} M parameters, static backbone "
                f"{report['static_gflops']:.3f} GFLOPs",
                ["exit", "GFLOPs", "cumulative GFLOPs"],
                [[e["name"], f"{e['gflops']:.3f}", f"{e['cumulative_gflops']:.3f}"] for e in exits],
            )
        return report

    def benchmark(
        self,
        model: AdaptiveLitModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        batch_sizes: list[int] = [1, 64],  # noqa: B006 (jsonargparse needs a literal default)
        repeats: int = 5,
        warmup: int = 2,
        fused_attn: bool | None = None,
        format: Literal["table", "json"] = "table",
        output: str | None = None,
    ) -> list[dict[str, Any]]:
        """Images/s and latency of the static backbone and of the method's adaptive inference.

        Random input of the configured size, eval mode, `torch.inference_mode`; the static model
        and every mode are timed in turns (`time_turns`), each figure the median of `repeats`
        turns after `warmup` untimed ones. Speed is measured as a ratio within one run:
        `speedup` = static time / adaptive time, next to `flops_reduction` = static GFLOPs /
        executed GFLOPs; `efficiency` = speedup / flops_reduction. `speedup_spread` and
        `efficiency_spread` give the lowest and highest of a single turn (static and adaptive
        timed back to back): on a shared machine they show how far its load moved the figures.

        Args:
            model: the configured LightningModule.
            datamodule: unused.
            ckpt_path: weights to load first (optional: speed does not depend on them, but
                adaptive decisions may).
            batch_sizes: batch sizes to measure.
            repeats: timed runs per measurement.
            warmup: untimed runs before timing.
            fused_attn: attention kernel for both models (None: the default, fused).
            format: ``table`` or ``json``.
            output: also write the rows as JSON to this file.
        """
        if ckpt_path:
            load_run_checkpoint(model, ckpt_path)
        device = self.strategy.root_device
        net = model.net.to(device).eval()
        static = net.static_baseline().to(device).eval()
        set_fused_attn(net, fused_attn)
        set_fused_attn(static, fused_attn)
        static_gflops = net.static_gflops()
        rows = []
        for batch_size in batch_sizes:
            x = torch.randn(batch_size, *net.input_size(), device=device)
            with torch.inference_mode():  # how inference is deployed: no autograd bookkeeping
                runs: dict[str, Callable[[], Any]] = {"static": lambda: static(x)}
                gflops = {"static": static_gflops}
                for label, run in net.benchmark_modes(x):
                    runs[label], gflops[label] = run, float(run().gflops.mean())
                turns = time_turns(runs, repeats, warmup, device)
            rows += [benchmark_row(label, batch_size, turns[label], turns["static"], gflops[label],
                                   static_gflops) for label in runs]
        for row in rows:
            row.update(threads=torch.get_num_threads(), device=str(device), model=type(net).__name__)
        if output:
            with open(output, "w") as f:
                json.dump(rows, f, indent=2)
        if format == "json":
            print(json.dumps(rows, indent=2))
        else:
            print_table(
                f"{type(net).__name__} on {device}, {torch.get_num_threads()} threads",
                ["mode", "batch", "images/s", "latency ms", "GFLOPs", "FLOPs reduction", "speedup", "efficiency",
                 "efficiency, turns"],
                [[r["mode"], r["batch_size"], f"{r['images_per_s']:.1f}", f"{r['latency_ms']:.1f}",
                  f"{r['gflops']:.3f}", f"{r['flops_reduction']:.2f}x", f"{r['speedup']:.2f}x",
                  f"{r['efficiency']:.2f}", "{:.2f}–{:.2f}".format(*r["efficiency_spread"])] for r in rows],
            )
        return rows


def time_turns(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
               device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds of each run in each turn, timed in turns (a, b, c, a, b, c, ...) so that a change
    of machine speed or load hits every run alike and their ratios stay meaningful.

    Args:
        runs: label → a callable doing the work once.
        repeats: timed turns.
        warmup: untimed turns first.
        device: synchronised around each run when it is a CUDA device.
    """
    def timed(run: Callable[[], Any]) -> float:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for run in runs.values():
            timed(run)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(max(1, repeats)):
        for label, run in runs.items():
            times[label].append(timed(run))
    return times


def benchmark_row(mode: str, batch_size: int, turns: list[float], static_turns: list[float], gflops: float,
                  static_gflops: float) -> dict[str, Any]:
    """One benchmark row from the per-turn seconds of a mode and of the static model: medians, and
    the lowest and highest speedup of a single turn (how much the machine's load moved it)."""
    seconds, static_seconds = statistics.median(turns), statistics.median(static_turns)
    speedup = static_seconds / seconds
    reduction = static_gflops / gflops
    per_turn = [s / t for s, t in zip(static_turns, turns)]
    spread = [min(per_turn), max(per_turn)]
    return {
        "mode": mode, "batch_size": batch_size, "images_per_s": batch_size / seconds,
        "latency_ms": 1000 * seconds, "gflops": gflops, "flops_reduction": reduction,
        "speedup": speedup, "efficiency": speedup / reduction,
        "speedup_spread": spread, "efficiency_spread": [v / reduction for v in spread],
    }


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on stdout (the `flops` and `benchmark` tables; benchmark scripts use it too)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console(width=140).print(table)
