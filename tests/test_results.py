"""`benchmarks/results.py` (`make results`): its measurements, choices and writers, and a smoke run."""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from adaptive_vit.backbones import BackboneSpec
from adaptive_vit.methods.cfvit.lit import CFViTLitModule
from adaptive_vit.trainer import time_turns
from benchmarks import results


@pytest.fixture(scope="module")
def tiny_cfvit() -> CFViTLitModule:
    torch.manual_seed(0)
    return CFViTLitModule(backbone=BackboneSpec("vit_tiny_patch16_224", img_size=32, patch_size=4, kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}), coarse_grid=4,
                          cls_attn_start=1, num_classes=10).eval()


def test_evaluate_counts_exits_gflops_and_accuracy_over_uneven_batches(tiny_cfvit: CFViTLitModule) -> None:
    net = tiny_cfvit.net
    torch.manual_seed(1)
    x, y = torch.randn(21, 3, 32, 32), torch.randint(0, 10, (21,))
    batches = list(zip(x.split(8), y.split(8)))  # 8, 8, 5 images
    coarse, fine = net.exit_gflops()
    with torch.no_grad():
        exits = net.forward_exits(x)
    confidence = exits[0].softmax(-1).amax(-1)

    early = results.evaluate(net, batches, [0.0])  # every image answers at the coarse exit
    assert early["exit_fractions"] == [1.0, 0.0]
    assert early["gflops"] == pytest.approx(coarse, rel=1e-6)
    assert early["top1"] == pytest.approx((exits[0].argmax(-1) == y).float().mean().item())

    late = results.evaluate(net, batches, [math.inf])  # every image goes on to the fine stage
    assert late["exit_fractions"] == [0.0, 1.0]
    assert late["gflops"] == pytest.approx(fine, rel=1e-6)
    assert late["top1"] == pytest.approx((exits[1].argmax(-1) == y).float().mean().item(), abs=1e-6)

    threshold = confidence.median().item()
    mixed = results.evaluate(net, batches, [threshold])
    stop = (confidence >= threshold).float().mean().item()
    assert mixed["exit_fractions"] == pytest.approx([stop, 1 - stop])
    assert mixed["gflops"] == pytest.approx(stop * coarse + (1 - stop) * fine, rel=1e-5)
    assert mixed["count"] == 21 and not mixed["kept"]


def test_skip_ratios_count_heads_and_tokens_among_executed_blocks() -> None:
    # 4 images, 3 blocks: block 0 run by all, block 1 by 2 images, block 2 by none.
    kept = {"blocks": torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64),
            "heads": torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64),
            "tokens": torch.tensor([4.0, 1.5, 0.0], dtype=torch.float64)}
    ratios = results.skip_ratios(kept, 4)
    assert ratios["blocks"] == pytest.approx([0.0, 0.5, 1.0])
    assert ratios["heads"][:2] == pytest.approx([0.5, 0.75]) and math.isnan(ratios["heads"][2])
    assert ratios["tokens"][:2] == pytest.approx([0.0, 0.25])


def test_time_turns_takes_turns() -> None:
    order = []

    def sleeper(label: str, seconds: float):
        def run() -> None:
            order.append(label)
            time.sleep(seconds)
        return run

    turns = time_turns({"a": sleeper("a", 0.002), "b": sleeper("b", 0.02)}, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert len(turns["a"]) == len(turns["b"]) == 3
    assert all(0.002 <= a < b and b >= 0.02 for a, b in zip(turns["a"], turns["b"]))


def _row(method: str, budget: str, kind: str, top1: float, gflops: float, val_top1: float | None,
         exits: dict[str, float] | None = None) -> dict:
    return {
        "method": method, "budget": budget, "kind": kind, "test_top1": top1, "gflops": gflops,
        "gflops_ratio": gflops / 0.0153, "timed_gflops": gflops, "val_top1": val_top1, "val_gflops": gflops,
        "exit_fractions": exits or {"final": 1.0}, "robust_clean_top1": top1,
        "robust": {"pgd_eps0.002": top1 - 0.05, "fgsm_eps0.03": top1 / 2}, "thresholds": [0.5] if exits else [],
        "test_seconds": 1.0, "images_per_s": 1000.0 * 0.0153 / gflops, "static_images_per_s": 1000.0,
        "speedup": 0.0153 / gflops * 0.9, "flops_reduction": 0.0153 / gflops, "efficiency": 0.9,
        "method_seconds": 10.0,
    }


def synthetic_report() -> dict:
    curve = [_row("dvt", f"curve_{i:02d}", "curve", 0.6 + 0.02 * i, 0.004 + 0.003 * i, 0.62 + 0.02 * i,
                  {"4x4": 1 - 0.1 * i, "6x6": 0.05 * i, "8x8": 0.05 * i}) for i in range(10)]
    rows = [
        _row("static", "static", "static", 0.78, 0.0153, 0.74),
        _row("dvt", "fraction_0.25", "fraction", 0.70, 0.0082, 0.71, {"4x4": 0.6, "6x6": 0.2, "8x8": 0.2}),
        *curve,
        _row("mia", "operating point", "operating point", 0.54, 0.0037, None),
    ]
    return {
        "provenance": {"command": "python -m benchmarks.results", "date": "2026-11-22 06:00 UTC",
                       "commit": "abc1234", "threads": 2, "torch": "2", "total_minutes": 30.0},
        "quick": False, "repeats": 5, "batch_size": 64, "test_images": 500, "static_val_top1": 0.74,
        "chosen": {"static": "static", "dvt": results.matching_static(rows[1:-1], 0.74)["budget"],
                   "mia": "operating point"},
        "methods": {"static": {}, "dvt": {},
                    "mia": {"skip_ratios": {"blocks": [0.0, 0.9, 1.0, 1.0], "heads": [0.1, 0.2, math.nan, math.nan],
                                            "tokens": [0.3, 0.2, math.nan, math.nan]}}},
        "rows": rows,
    }


def test_matching_static_is_the_cheapest_reaching_static_on_validation() -> None:
    report = synthetic_report()
    dvt = [r for r in report["rows"] if r["method"] == "dvt"]
    chosen = results.matching_static(dvt, 0.74)
    assert chosen["budget"] == "curve_06"  # val 0.74 at 0.022 GFLOPs; curve_07+ are dearer
    assert results.matching_static(dvt, 0.99)["budget"] == "curve_09"  # none reaches: most accurate
    mia = [r for r in report["rows"] if r["method"] == "mia"]
    assert results.matching_static(mia, 0.74)["budget"] == "operating point"


def test_write_outputs_tables_and_small_figures(tmp_path: Path) -> None:
    report = synthetic_report()
    table = results.write_outputs(tmp_path, report)
    for name in ("demo.json", "demo.csv", "README_table.md", "accuracy_vs_gflops.png", "exits.png", "mia_skipping.png"):
        assert (tmp_path / name).is_file(), name
    for png in tmp_path.glob("*.png"):
        assert png.stat().st_size < 100_000, png
    saved = json.loads((tmp_path / "demo.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["methods"]["mia"]["skip_ratios"]["heads"][2] is None
    with open(tmp_path / "demo.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(report["rows"])
    dvt = next(r for r in rows if r["budget"] == "fraction_0.25")
    assert float(dvt["exit_4x4"]) == 0.6 and float(dvt["robust_pgd_eps0.002_top1"]) == pytest.approx(0.65)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[2].strip() for line in lines[1:]] == [
        "`static`", "`fraction_0.25`", "`curve_06` ★", "`operating point` ★"]  # other curve points left out
    assert "| 72.0 % | 0.0220 |" in lines[3] and "commit `abc1234`" in table
    assert (tmp_path / "README_table.md").read_text() == table


def test_mia_variants_cover_the_targets_the_seeds_and_the_three_ablations() -> None:
    variants = results.mia_variants("static.ckpt", 0.02, target=0.016)
    targets = {name: gflops for name, (kind, gflops, _) in variants.items() if kind == "curve"}
    assert targets == pytest.approx({f"target_{f}": f * 0.02 for f in results.MIA_TARGETS})
    seeds = {name: arguments for name, (kind, _, arguments) in variants.items() if kind == "seed"}
    assert set(seeds) == {f"seed_{seed}" for seed in results.MIA_SEEDS} and len(seeds) >= 2
    for name, arguments in seeds.items():  # the demo config at its own target, another seed
        flags = dict(zip(arguments[::2], arguments[1::2]))
        assert flags == {"--model.init_args.init_from": "static.ckpt", "--model.init_args.target_gflops": "0.016",
                         "--seed_everything": name.split("_")[1]}
    ablations = {name: arguments for name, (kind, _, arguments) in variants.items() if kind == "ablation"}
    assert set(ablations) == {"blocks_only", "heads_only", "tokens_only"}
    for name, arguments in ablations.items():
        flags = dict(zip(arguments[::2], arguments[1::2]))  # {"--model.init_args.x": value}
        assert flags.pop("--model.init_args.init_from") == "static.ckpt"
        assert flags.pop("--model.init_args.target_gflops") == "0.016"
        switched_off = {flag.rsplit(".", 1)[1] for flag, value in flags.items() if value == "false"}
        assert switched_off == {"skip_blocks", "skip_heads", "skip_tokens"} - {f"skip_{name.split('_')[0]}"}


def test_mia_table_orders_targets_then_seeds_then_ablations_beside_the_static_model(tmp_path: Path) -> None:
    report = synthetic_report()
    report["rows"][-1]["target_gflops"] = 0.0122
    variant = {"method": "mia", "exit_fractions": {}, "robust": {"pgd_eps0.002": 0.5, "fgsm_eps0.03": 0.2}}
    report["rows"] += [
        {**variant, "budget": "target_0.9", "kind": "curve", "target_gflops": 0.0138, "test_top1": 0.80,
         "gflops": 0.0137, "gflops_ratio": 0.0137 / 0.0153},
        {**variant, "budget": "target_0.6", "kind": "curve", "target_gflops": 0.0092, "test_top1": 0.70,
         "gflops": 0.0091, "gflops_ratio": 0.0091 / 0.0153},
        {**variant, "budget": "seed_1", "kind": "seed", "target_gflops": 0.0122, "test_top1": 0.78,
         "gflops": 0.0123, "gflops_ratio": 0.0123 / 0.0153},
        {**variant, "budget": "heads_only", "kind": "ablation", "target_gflops": 0.0122, "test_top1": 0.75,
         "gflops": 0.0121, "gflops_ratio": 0.0121 / 0.0153},
    ]
    table = results.write_outputs(tmp_path, report)
    mia = table[table.index("| MIA-Former |"):].splitlines()
    names = [line.split("|")[1].strip() for line in mia[2:] if line.startswith("| ")]
    assert names == ["static model", "target 0.6", "all three (demo config)", "target 0.9", "all three, seed 1",
                     "heads only"]
    assert "| 0.0092 (0.60) | 70.0 % | -8.0 pts | 0.0091 | 0.59 | 50.0 % | 20.0 % |" in mia[3]
    main = table[:table.index("| MIA-Former |")]
    assert "target_0.9" not in main and "seed_1" not in main and "heads_only" not in main  # MIA-Former's table


def test_quick_run_of_the_static_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["results.py"])
    report = results.main(["--quick", "--only", "static", "--runs", str(tmp_path / "runs"),
                           "--out", str(tmp_path / "out"), "--repeats", "1"])
    [row] = report["rows"]
    assert row["method"] == "static" and row["kind"] == "static"
    assert report["test_images"] == 128  # the two test batches of --quick
    assert row["gflops"] == pytest.approx(0.0153, rel=0.01) and row["speedup"] == 1.0
    assert row["images_per_s"] > 0 and set(row["robust"]) == {"pgd_eps0.002", "fgsm_eps0.03"}
    assert (tmp_path / "out" / "accuracy_vs_gflops.png").is_file()
    assert "`static`" in (tmp_path / "out" / "README_table.md").read_text()


def test_quick_run_of_mia_former_with_a_further_target_and_an_ablation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["results.py"])
    monkeypatch.setattr(results, "MIA_TARGETS", (0.6,))
    monkeypatch.setattr(results, "MIA_SEEDS", ())
    monkeypatch.setattr(results, "MIA_ABLATIONS", {"tokens_only": results.MIA_ABLATIONS["tokens_only"]})
    report = results.main(["--quick", "--only", "mia", "--runs", str(tmp_path / "runs"),
                           "--out", str(tmp_path / "out"), "--repeats", "1"])
    rows = {row["budget"]: row for row in report["rows"] if row["method"] == "mia"}
    assert set(rows) == {"operating point", "target_0.6", "tokens_only"}
    static_gflops = next(r for r in report["rows"] if r["method"] == "static")["gflops"]
    assert rows["target_0.6"]["target_gflops"] == pytest.approx(0.6 * static_gflops, rel=1e-5)
    assert rows["tokens_only"]["target_gflops"] == rows["operating point"]["target_gflops"]
    for row in rows.values():  # each its own fit, tested with the attacks
        assert 0 < row["gflops"] and set(row["robust"]) == {"pgd_eps0.002", "fgsm_eps0.03"}
    assert (tmp_path / "runs" / "demo_mia_target_0.6").is_dir() and (tmp_path / "runs" / "demo_mia_tokens_only").is_dir()
    assert "| target 0.6 |" in (tmp_path / "out" / "README_table.md").read_text()
