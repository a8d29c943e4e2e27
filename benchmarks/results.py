"""`make results`: one comparison of the static demo model and the three methods, from scratch.

Trains and tests every demo config (`benchmarks/demo.py`: static first, MIA-Former from its
checkpoint), then, per method and per operating point:

- CF-ViT and DVT: every budget `ThresholdCalibration` stored in the checkpoint (the named ones and
  the accuracy-GFLOPs curve, thresholds fitted on the validation digits), each tested again with
  `trainer.test` at that budget (test top-1, mean GFLOPs, PGD/FGSM robust top-1 from
  `RobustnessEvaluation`);
- MIA-Former and the static model: their single operating point; MIA-Former then also at
  further FLOPs targets (`MIA_TARGETS`, fractions of the static model's GFLOPs) and, at the
  demo config's target, with one decision dimension at a time (`MIA_ABLATIONS`, the paper's
  Table 2), and with other seeds (`MIA_SEEDS`), each its own three-stage fit from the static
  checkpoint, tested with PGD/FGSM;

and times the network's real `forward_adaptive` at those thresholds on the test images in
batches of 64, interleaved with the static demo model in the same process (median of --repeats),
so each row has a measured speedup beside its FLOPs reduction.

Writes into --out (default results/): demo.json, demo.csv, accuracy_vs_gflops.png, exits.png,
mia_skipping.png and README_table.md (the README's tables, with the command, date and commit).

    python -m benchmarks.results                # `make results` (run times: docs/performance.md)
    python -m benchmarks.results --quick        # 1 short epoch each, 2 test batches: a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaptive_vit import reports
from adaptive_vit.callbacks import RobustnessEvaluation
from adaptive_vit.methods.network import AdaptiveNetwork
from adaptive_vit.trainer import benchmark_row, time_turns
from benchmarks.demo import REPO, DemoRun, fit_and_test, run_demos

BATCH = 64  # batch size of the throughput figures

QUICK_TRAINER = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                 "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2"]
QUICK = {  # one short epoch each (MIA-Former: one per stage)
    "mia": [*QUICK_TRAINER, "--trainer.max_epochs", "4", "--model.init_args.stage_epochs", "[1, 1, 1, 1]"],
}

# MIA-Former's further operating points, each a whole pipeline (stages 1-3) from the static
# checkpoint: the paper trains one model per target, and stage 1 (target-free) is one epoch.
# Fractions of the static GFLOPs; the demo config holds 0.8. With the seeds and the ablations,
# seven fits beside the demo config's (two at a time) keep `make results` under 30 minutes on
# 2 cores (26 min 36 s at 6bb7933); target 0.9 as well (at 6a87630) made it 30 min 8 s.
MIA_TARGETS = (0.6, 0.7)
# The demo config again with other seeds: on the demo, co-training's outcome depends on the seed
# (docs/performance.md, MIA-Former: demo accuracy), so one run's figure comes with two more
MIA_SEEDS = (1, 2)
MIA_ABLATIONS = {  # the paper's Table 2: one decision dimension at the demo config's target
    "blocks_only": ["--model.init_args.skip_heads", "false", "--model.init_args.skip_tokens", "false"],
    "heads_only": ["--model.init_args.skip_blocks", "false", "--model.init_args.skip_tokens", "false"],
    "tokens_only": ["--model.init_args.skip_blocks", "false", "--model.init_args.skip_heads", "false"],
}

Batches = list[tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------- operating points


def operating_points(run: DemoRun) -> list[tuple[str | None, str]]:
    """(budget name, kind) to evaluate: every calibrated budget, or the model's single point."""
    calibrations = run.test.model.exit_policy.calibrations
    if not calibrations:
        return [(None, "static" if run.name == "static" else "operating point")]
    return [(name, calibration["kind"]) for name, calibration in calibrations.items()]


def test_at(run: DemoRun, budget: str | None, attack: bool = True) -> tuple[dict[str, float], float]:
    """`trainer.test` the run's model at a calibrated budget: (logged metrics, seconds).

    The test CLI already evaluated the selected budget (or the single operating point): its
    metrics are reused rather than computed twice.

    Args:
        run: the trained and tested run.
        budget: a calibrated budget's name (None: the run's single operating point).
        attack: run the `RobustnessEvaluation` attacks too (the slow part of a test).
    """
    model, trainer = run.test.model, run.test.trainer
    if budget is None or budget == selected_budget(run):
        return run.metrics, 0.0
    model.exit_policy.budget = budget  # `on_test_start` selects its thresholds
    robustness = [cb for cb in trainer.callbacks if isinstance(cb, RobustnessEvaluation)]
    saved = [cb.on_test for cb in robustness]
    for cb in robustness:
        cb.on_test = cb.on_test and attack
    start = time.time()
    try:
        [metrics] = trainer.test(model, datamodule=run.test.datamodule, verbose=False)
    finally:
        for cb, on_test in zip(robustness, saved):
            cb.on_test = on_test
    return {k: float(v) for k, v in metrics.items()}, time.time() - start


def selected_budget(run: DemoRun) -> str | None:
    """The budget the run's own `test` used (the model's `budget`, else the callback's `select`)."""
    model = run.test.model
    if model.exit_policy.budget:
        return model.exit_policy.budget
    return next((cb.select for cb in run.test.trainer.callbacks if hasattr(cb, "select")), None)


def robust_top1(metrics: dict[str, float]) -> dict[str, float]:
    """{attack label: robust top-1} from a test's logged metrics (`RobustnessEvaluation`)."""
    return {key.split("/")[2]: value for key, value in metrics.items()
            if key.startswith("test/robust/") and key.endswith("/top1") and key.count("/") == 3}


def test_batches(run: DemoRun) -> Batches:
    """The test images `test` evaluated (its loader, cut to `limit_test_batches`), in memory, in
    batches of `BATCH`."""
    loader = run.test.datamodule.test_dataloader()
    count = run.test.trainer.num_test_batches[0]
    parts = [batch for _, batch in zip(range(count), loader)]
    x = torch.cat([b[0] for b in parts])  # (N, C, H, W)
    y = torch.cat([b[1] for b in parts])  # (N,)
    return list(zip(x.split(BATCH), y.split(BATCH)))


@torch.no_grad()
def evaluate(net: AdaptiveNetwork, batches: Batches, thresholds: Sequence[float]) -> dict[str, Any]:
    """Top-1, mean GFLOPs, exit fractions and per-block kept fractions of `forward_adaptive`.

    Returns:
        ``top1``, ``gflops`` (means over the images), ``exit_fractions`` (K,) and ``kept``
        {kind: (L,) summed kept fraction per block} for networks reporting decisions.
    """
    correct, gflops, count = 0, 0.0, 0
    exits = torch.zeros(net.num_exits, dtype=torch.float64)
    kept: dict[str, Tensor] = {}
    for x, y in batches:
        out = net.forward_adaptive(x, thresholds)
        correct += int((out.logits.argmax(-1) == y).sum())
        gflops += float(out.gflops.double().sum())
        count += len(y)
        exits += torch.bincount(out.exit_index.cpu(), minlength=net.num_exits).double()
        for kind, fraction in (out.decisions or {}).items():  # (B, L)
            kept[kind] = kept.get(kind, 0) + fraction.double().sum(0).cpu()
    return {"top1": correct / count, "gflops": gflops / count, "count": count,
            "exit_fractions": (exits / count).tolist(), "kept": kept}


def skip_ratios(kept: dict[str, Tensor], count: int) -> dict[str, list[float]]:
    """Per-block skip ratios from summed kept fractions (B-summed (L,) tensors of `evaluate`).

    ``blocks``: fraction of images skipping the block. Other kinds (heads, tokens): fraction
    skipped among the images that execute the block (the sliced path reports 0 kept for a
    skipped block, so its sums are divided by the executed count), NaN where no image executes it.
    """
    ratios = {}
    executed = kept.get("blocks")
    for kind, total in kept.items():
        if kind == "blocks" or executed is None:
            ratios[kind] = (1 - total / count).tolist()
        else:
            ratios[kind] = torch.where(executed > 0, 1 - total / executed.clamp(min=1e-12), math.nan).tolist()
    return ratios


def passes(net: AdaptiveNetwork, batches: Batches, thresholds: Sequence[float]) -> Callable[[], None]:
    """One inference pass over the batches at the given thresholds (what gets timed)."""
    def run() -> None:
        for x, _ in batches:
            net.forward_adaptive(x, thresholds)
    return run


# ---------------------------------------------------------------------- one method


def method_rows(run: DemoRun, static: DemoRun, repeats: int,
                robust_curve: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every operating point of one run as a result row, and the method's extras (exit names and
    costs, per-block skip ratios of skipping networks).

    Args:
        run: the method's trained and tested run.
        static: the static demo model's run (the reference of every speedup).
        repeats: timed passes over the test images per operating point (the median counts).
        robust_curve: also attack at the accuracy-GFLOPs curve's budgets (else the named ones only).
    """
    start = time.time()
    model, net = run.test.model, run.test.model.net.eval()
    static_net = static.test.model.net.eval()
    batches = test_batches(run)
    images = sum(len(y) for _, y in batches)
    static_gflops = net.static_gflops()
    # The static run's own point is also labelled "static": it replaces this entry (the same net).
    rows, timed, kept = [], {"static": passes(static_net, batches, [])}, {}
    for budget, kind in operating_points(run):
        metrics, seconds = test_at(run, budget, attack=robust_curve or kind != "curve")
        model.exit_policy.budget = budget
        model.exit_policy.apply()
        thresholds = net.exit_thresholds.tolist()
        measured = evaluate(net, batches, thresholds)
        if abs(measured["top1"] - metrics["test/top1"]) > 1e-6:
            print(f"warning: {run.name} {budget}: forward_adaptive top-1 {measured['top1']:.4f} "
                  f"differs from test's {metrics['test/top1']:.4f}")
        kept = kept or measured["kept"]
        point = budget or kind
        timed[point] = passes(net, batches, thresholds)
        calibration = model.exit_policy.calibrations.get(budget, {})
        rows.append({
            "method": run.name, "budget": point, "kind": kind,
            "target_gflops": getattr(model.hparams, "target_gflops", None),
            "test_top1": metrics["test/top1"], "gflops": metrics["test/gflops"],
            "gflops_ratio": metrics["test/gflops"] / static_gflops,
            "timed_gflops": measured["gflops"],
            "val_top1": calibration.get("accuracy", run.best_val_top1),
            "val_gflops": calibration.get("gflops"),
            "exit_fractions": dict(zip(net.exit_names, measured["exit_fractions"])),
            "robust_clean_top1": metrics.get("test/robust/clean_top1"),
            "robust": robust_top1(metrics),
            "thresholds": thresholds,
            "test_seconds": round(seconds, 1),
        })
    with torch.no_grad():
        turns = time_turns(timed, repeats)
    for row in rows:
        speed = benchmark_row(row["budget"], images, turns[row["budget"]], turns["static"],
                              row["timed_gflops"], static_gflops)
        row.update({key: speed[key] for key in ("images_per_s", "speedup", "flops_reduction", "efficiency")})
        row.update({
            "static_images_per_s": images / statistics.median(turns["static"]),
            "method_seconds": round(run.seconds + time.time() - start, 1),
        })
    extras = {"exit_names": list(net.exit_names), "exit_gflops": net.exit_gflops(),
              "static_gflops": static_gflops, "checkpoint": run.checkpoint, "test_images": images,
              "threads": torch.get_num_threads()}
    if kept:
        extras["skip_ratios"] = skip_ratios(kept, images)
    return rows, extras


# ---------------------------------------------------------------------- MIA-Former: targets, ablations


def mia_variants(static_checkpoint: str, static_gflops: float, target: float) -> dict[str, tuple[str, float, list[str]]]:
    """{name: (kind, target GFLOPs, CLI arguments)} of the further MIA-Former fits.

    Args:
        static_checkpoint: the static demo model's checkpoint (every fit's `init_from`).
        static_gflops: its GFLOPs per image (the targets are fractions of it).
        target: the demo config's target (the ablations' target).
    """
    variants = {}
    for fraction in MIA_TARGETS:
        variants[f"target_{fraction}"] = ("curve", fraction * static_gflops, [])
    for seed in MIA_SEEDS:
        variants[f"seed_{seed}"] = ("seed", target, ["--seed_everything", str(seed)])
    for name, arguments in MIA_ABLATIONS.items():
        variants[name] = ("ablation", target, arguments)
    return {name: (kind, gflops, ["--model.init_args.init_from", static_checkpoint,
                                  "--model.init_args.target_gflops", f"{gflops:.6g}", *arguments])
            for name, (kind, gflops, arguments) in variants.items()}


def fit_and_test_mia(job: tuple[str, list[str], str]) -> dict[str, Any]:
    """One MIA-Former variant's fit and test in a worker process with one thread: its metrics."""
    name, arguments, runs = job
    torch.set_num_threads(1)
    run = fit_and_test(f"mia_{name}", REPO / "configs/demo/mia.yaml", Path(runs), arguments)
    return {"metrics": run.metrics, "seconds": run.seconds, "checkpoint": run.checkpoint}


def mia_variant_rows(main: dict[str, Any], static: DemoRun, runs: Path, extra: list[str],
                     jobs: int) -> list[dict[str, Any]]:
    """Fit and test every `mia_variants` entry (`jobs` at a time, one thread each: tiny models use
    two cores better as two processes) and return their result rows (no timing: the speed
    columns belong to the demo config's point).

    Args:
        main: the demo config's MIA-Former row (its target and GFLOPs are the ablations').
        static: the static demo run (checkpoint and GFLOPs).
        runs: root folder of the runs.
        extra: further CLI arguments of every fit and test (e.g. --quick's short epochs).
        jobs: processes at a time.
    """
    static_gflops = static.test.model.net.static_gflops()
    variants = mia_variants(static.checkpoint, static_gflops, main["target_gflops"])
    work = [(name, [*arguments, *extra], str(runs)) for name, (_, _, arguments) in variants.items()]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        results = pool.map(fit_and_test_mia, work, chunksize=1)
    rows = []
    for (name, (kind, target, _)), result in zip(variants.items(), results):
        metrics = result["metrics"]
        rows.append({
            "method": "mia", "budget": name, "kind": kind, "target_gflops": target,
            "test_top1": metrics["test/top1"], "gflops": metrics["test/gflops"],
            "gflops_ratio": metrics["test/gflops"] / static_gflops,
            "robust_clean_top1": metrics.get("test/robust/clean_top1"), "robust": robust_top1(metrics),
            "exit_fractions": {}, "method_seconds": result["seconds"], "checkpoint": result["checkpoint"],
        })
    return rows


# ---------------------------------------------------------------------- choosing and writing


def matching_static(rows: list[dict[str, Any]], static_val_top1: float | None) -> dict[str, Any]:
    """The operating point of one method the README reports: the cheapest (validation GFLOPs)
    whose validation top-1 reaches the static model's, else the most accurate on validation.

    Chosen on validation, so the test figures stay honest. Rows without a validation top-1 (e.g.
    MIA-Former's single point) are chosen as they are.
    """
    known = [r for r in rows if r.get("val_top1") is not None]
    if not known:
        return rows[0]
    if static_val_top1 is not None:
        reaching = [r for r in known if r["val_top1"] >= static_val_top1 - 1e-9]
        if reaching:
            return min(reaching, key=lambda r: r["val_gflops"] if r["val_gflops"] is not None else r["gflops"])
    return max(known, key=lambda r: r["val_top1"])


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row for the CSV: exit fractions and robust top-1 as columns of their own."""
    flat = {k: v for k, v in row.items() if k not in ("exit_fractions", "robust", "thresholds")}
    flat["thresholds"] = " ".join(f"{t:.6g}" for t in row.get("thresholds", []))
    flat.update({f"exit_{name}": f for name, f in row.get("exit_fractions", {}).items()})
    flat.update({f"robust_{label}_top1": v for label, v in row.get("robust", {}).items()})
    return flat


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    reports.write_csv(path, [flat_row(r) for r in rows])


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _robust(row: dict[str, Any], attack: str) -> float | None:
    return next((v for label, v in row.get("robust", {}).items() if label.startswith(attack)), None)


def markdown_table(report: dict[str, Any]) -> str:
    """The README's results table: the static model, then per method its named budgets and the
    point matching the static model's validation top-1 (marked), with provenance."""
    header = ("| method | budget | test top-1 | GFLOPs / image | vs static | images/s (batch 64) | "
              "measured speedup | FLOPs reduction | PGD | FGSM |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    rows = report["rows"]
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        chosen = report["chosen"].get(method)
        for row in own:
            is_chosen = chosen is not None and row["budget"] == chosen
            if row["kind"] in ("curve", "seed", "ablation") and not is_chosen:  # their own figure, MIA-Former's own table
                continue
            budget = f"`{row['budget']}`" + (" ★" if is_chosen and row["kind"] != "static" else "")
            lines.append(
                f"| {method} | {budget} | {_pct(row['test_top1'])} | {row['gflops']:.4f} | "
                f"{row['gflops_ratio']:.2f} | {row['images_per_s']:.0f} | {row['speedup']:.2f}x | "
                f"{row['flops_reduction']:.2f}x | {_pct(_robust(row, 'pgd'))} | {_pct(_robust(row, 'fgsm'))} |"
            )
    p = report["provenance"]
    mia = mia_table(rows)
    return "\n".join([
        *lines, "",
        f"★ the cheapest budget whose validation top-1 reaches the static model's (else the most "
        f"accurate one). Test split: {report['test_images']} digits; speed: `forward_adaptive` on "
        f"batches of {BATCH}, median of {report['repeats']} passes, interleaved with the static "
        f"model, {p['threads']} CPU threads. Every budget's row: `demo.csv` beside this table.",
        f"Produced by `{p['command']}` on {p['date']} at commit `{p['commit']}` in "
        f"{p['total_minutes']:.0f} min.",
        *(["", mia] if mia else []),
    ]) + "\n"


def mia_table(rows: list[dict[str, Any]]) -> str:
    """MIA-Former at each FLOPs target and, at one target, with one decision dimension at a time
    (the paper's Table 2), beside the static model (empty without variants)."""
    static = next((r for r in rows if r["method"] == "static"), None)
    mia = [r for r in rows if r["method"] == "mia"]
    if len(mia) < 2 or static is None:
        return ""
    lines = ["| MIA-Former | target (vs static) | test top-1 | vs static top-1 | GFLOPs / image | vs static | PGD | FGSM |",
             "|---|---|---|---|---|---|---|---|",
             f"| static model | | {_pct(static['test_top1'])} | | {static['gflops']:.4f} | 1.00 | "
             f"{_pct(_robust(static, 'pgd'))} | {_pct(_robust(static, 'fgsm'))} |"]
    curve = sorted((r for r in mia if r["kind"] in ("operating point", "curve")), key=lambda r: r["target_gflops"] or 0)
    for row in [*curve, *(r for r in mia if r["kind"] == "seed"), *(r for r in mia if r["kind"] == "ablation")]:
        label = row["budget"].replace("_", " ")
        name = {"operating point": "all three (demo config)", "seed": f"all three, {label}"}.get(row["kind"], label)
        target = row["target_gflops"]
        lines.append(
            f"| {name} | {target:.4f} ({target / static['gflops']:.2f}) | {_pct(row['test_top1'])} | "
            f"{100 * (row['test_top1'] - static['test_top1']):+.1f} pts | {row['gflops']:.4f} | "
            f"{row['gflops_ratio']:.2f} | {_pct(_robust(row, 'pgd'))} | {_pct(_robust(row, 'fgsm'))} |"
        )
    return "\n".join([*lines, "", "Each MIA-Former row is its own fit (stages 1-3) from the static "
                      "checkpoint; PGD and FGSM as in the table above."])


# ---------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(path: Path, rows: list[dict[str, Any]]) -> None:
    """Test top-1 against mean GFLOPs: a curve per calibrated method, a point per single model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["gflops"], 100 * r["test_top1"]) for r in rows
                        if r["method"] == method and r["kind"] not in ("seed", "ablation"))
        if method == "static":
            ax.plot(*zip(*points), "k*", ms=14, label="static ViT", zorder=3)
        else:
            ax.plot(*zip(*points), "-o" if len(points) > 1 else "D", ms=4 if len(points) > 1 else 8, label=method)
    seeds = [r for r in rows if r["kind"] == "seed"]
    if seeds:
        ax.plot([r["gflops"] for r in seeds], [100 * r["test_top1"] for r in seeds], "x", color="grey", ms=7,
                label=f"{seeds[0]['method']}, other seeds")
    for row, marker in zip((r for r in rows if r["kind"] == "ablation"), "^vs"):
        ax.plot(row["gflops"], 100 * row["test_top1"], marker, ms=7, label=f"{row['method']} {row['budget'].replace('_', ' ')}")
    ax.set(xlabel="mean GFLOPs per image", ylabel="test top-1 (%)", title="Demo digits: accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_exits(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per multi-exit method, the fraction of test images answering at each exit against GFLOPs."""
    plt = _pyplot()
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)
               if len(next(r for r in rows if r["method"] == m)["exit_fractions"]) > 1]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.5 * max(1, len(methods)), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        own = sorted((r for r in rows if r["method"] == method), key=lambda r: r["gflops"])
        names = list(own[0]["exit_fractions"])
        ax.stackplot([r["gflops"] for r in own], *[[r["exit_fractions"][n] for r in own] for n in names],
                     labels=names, alpha=0.8)
        ax.set(xlabel="mean GFLOPs per image", ylabel="fraction of test images", title=f"{method}: answering exit",
               ylim=(0, 1))
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_skipping(path: Path, ratios: dict[str, list[float]], title: str) -> None:
    """Per-block skip ratios (blocks; heads and tokens among the images executing the block)."""
    plt = _pyplot()
    kinds = list(ratios)
    depth = len(ratios[kinds[0]])
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, kind in enumerate(kinds):
        label = kind if kind == "blocks" else f"{kind} (of executed blocks)"
        ax.bar([l + (i - (len(kinds) - 1) / 2) * width for l in range(depth)],
               [0 if math.isnan(v) else v for v in ratios[kind]], width, label=label)
    ax.set(xlabel="block", ylabel="skip ratio", ylim=(0, 1.05), title=title, xticks=range(depth))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(out: Path, report: dict[str, Any]) -> str:
    """demo.json, demo.csv, README_table.md and the figures; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(reports.json_safe(report), indent=2))
    write_csv(out / "demo.csv", report["rows"])
    table = markdown_table(report)
    (out / "README_table.md").write_text(table)
    plot_accuracy(out / "accuracy_vs_gflops.png", report["rows"])
    plot_exits(out / "exits.png", report["rows"])
    skipping = {m: e["skip_ratios"] for m, e in report["methods"].items() if "skip_ratios" in e}
    for method, ratios in skipping.items():
        name = "mia_skipping.png" if method == "mia" else f"{method}_skipping.png"
        plot_skipping(out / name, ratios, f"{method}: per-block skip ratios on the test digits")
    return table


# ---------------------------------------------------------------------- main


def provenance(argv: Sequence[str]) -> dict[str, Any]:
    """Command, UTC date, git commit (``+dirty`` with uncommitted changes) and torch threads."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"command": shlex.join(["python", "-m", "benchmarks.results", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "threads": torch.get_num_threads(), "torch": torch.__version__}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", help="where runs are written (default runs/results, with --quick runs/results_quick)")
    parser.add_argument("--out", help="where results are written (default results/, with --quick <runs>/results)")
    parser.add_argument("--quick", action="store_true", help="one short epoch each, two test batches: a smoke run")
    parser.add_argument("--only", nargs="*", choices=["static", "cfvit", "dvt", "mia"],
                        help="methods to run (the static model always runs: every speedup is measured against it)")
    parser.add_argument("--robust-curve", action="store_true",
                        help="also attack at every curve budget (slow: PGD per budget); default: named budgets only")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per operating point (median)")
    parser.add_argument("--mia-variants", action=argparse.BooleanOptionalAction, default=True,
                        help="MIA-Former at further targets and its Table-2 ablations (default: on)")
    parser.add_argument("--jobs", type=int, default=2, help="MIA-Former variants fitted at a time (one thread each)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    runs = Path(args.runs or ("runs/results_quick" if args.quick else "runs/results")).resolve()
    out = Path(args.out or (runs / "results" if args.quick else REPO / "results")).resolve()
    only = sorted({"static", *args.only}) if args.only else None
    extra = (lambda name: QUICK.get(name, QUICK_TRAINER)) if args.quick else (lambda name: [])
    start = time.time()
    rows, methods, static = [], {}, None
    for run in run_demos(runs, only, extra):
        static = static or run
        own, methods[run.name] = method_rows(run, static, args.repeats, args.robust_curve)
        rows += own
    if args.mia_variants and "mia" in methods:
        main_mia = next(r for r in rows if r["method"] == "mia")
        rows += mia_variant_rows(main_mia, static, runs, extra("mia"), args.jobs)
    static_val = static.best_val_top1 if static else None
    report = {
        "provenance": {**provenance(argv), "total_minutes": (time.time() - start) / 60},
        "quick": args.quick, "repeats": args.repeats, "batch_size": BATCH,
        "test_images": next(iter(methods.values()))["test_images"] if methods else 0,
        "static_val_top1": static_val,
        "chosen": {m: matching_static([r for r in rows if r["method"] == m], static_val)["budget"] for m in methods},
        "methods": methods,
        "rows": rows,
    }
    table = write_outputs(out, report)
    print("\n" + table)
    print(f"results: {out} (runs, logs and checkpoints: {runs})")
    return report


if __name__ == "__main__":
    main()
