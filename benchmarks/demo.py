"""`make demo`: train and test every demo config on the bundled digits, print accuracy and GFLOPs.

Runs, in order, each config of configs/demo/ that exists (the static model first: MIA-Former
starts from its checkpoint), `fit` then `test` on the best checkpoint, and prints one table.
Everything lands under --runs (default runs/demo); results also go to <runs>/demo_results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adaptive_vit.cli import main  # noqa: E402

# (name, config, needs the static model's checkpoint as init_from)
DEMOS = [
    ("static", "configs/demo/static.yaml", False),
    ("cfvit", "configs/demo/cfvit.yaml", False),
    ("dvt", "configs/demo/dvt.yaml", False),
    ("mia", "configs/demo/mia.yaml", True),
]


def run_demo(name: str, config: Path, runs: Path, extra: list[str]) -> dict:
    common = ["--config", str(config), "--trainer.default_root_dir", str(runs),
              "--trainer.logger.init_args.save_dir", str(runs), *extra]
    start = time.time()
    fit = main(["fit", *common])
    best = fit.trainer.checkpoint_callback.best_model_path or fit.trainer.checkpoint_callback.last_model_path
    test = main(["test", *common, "--ckpt_path", best])
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    return {
        "method": name,
        "checkpoint": best,
        "test_top1": metrics.get("test/top1"),
        "test_gflops": metrics.get("test/gflops"),
        "static_gflops": test.model.net.static_gflops(),
        "seconds": round(time.time() - start, 1),
        "metrics": metrics,
    }


def main_demo() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="runs/demo", help="where runs are written")
    parser.add_argument("--only", nargs="*", help="demo names to run (default: all present)")
    args = parser.parse_args()
    runs = Path(args.runs).resolve()
    results: list[dict] = []
    static_ckpt = None
    for name, config, needs_static in DEMOS:
        path = REPO / config
        if not path.exists() or (args.only and name not in args.only):
            continue
        extra = []
        if needs_static:
            if static_ckpt is None:
                print(f"skipping {name}: it starts from the static demo model, which did not run")
                continue
            extra = ["--model.init_args.init_from", static_ckpt]
        print(f"\n=== demo: {name} ({config}) ===", flush=True)
        result = run_demo(name, path, runs, extra)
        if name == "static":
            static_ckpt = result["checkpoint"]
        results.append(result)
    (runs / "demo_results.json").write_text(json.dumps(results, indent=2))
    print("\nDemo results (test split of the bundled digits, 500 images):")
    print(f"{'method':<8} {'top-1':>7} {'GFLOPs/img':>11} {'vs static':>10} {'time':>7}")
    for r in results:
        print(f"{r['method']:<8} {100 * r['test_top1']:6.1f}% {r['test_gflops']:11.4f} "
              f"{r['test_gflops'] / r['static_gflops']:9.2f}x {r['seconds']:6.0f}s")
    print(f"\nruns, logs and checkpoints: {runs}; table: {runs / 'demo_results.json'}")


if __name__ == "__main__":
    main_demo()
