"""`make demo`: train and test every demo config on the bundled digits, print accuracy and GFLOPs.

Runs, in order, each config of configs/demo/ that exists (the static model first: MIA-Former
starts from its checkpoint), `fit` then `test` on the best checkpoint, and prints one table.
Everything lands under --runs (default runs/demo), one folder per model (runs/demo/demo_<name>/version_N);
results also go to <runs>/demo_results.json.

`benchmarks/results.py` (`make results`) builds on the functions here (`run_demos`).

    python -m benchmarks.demo            # `make demo`, from the repository's root
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptive_vit.cli import AdaptiveViTCLI, main

REPO = Path(__file__).resolve().parents[1]

# (name, config, needs the static model's checkpoint as init_from)
DEMOS = [
    ("static", "configs/demo/static.yaml", False),
    ("cfvit", "configs/demo/cfvit.yaml", False),
    ("dvt", "configs/demo/dvt.yaml", False),
    ("mia", "configs/demo/mia.yaml", True),
]


@dataclass
class DemoRun:
    """One demo model trained and tested.

    Attributes:
        name: the demo's name (``static``, ``cfvit``, ...).
        checkpoint: the checkpoint `test` evaluated (the best one, else the last one).
        best_val_top1: the monitored validation top-1 of that checkpoint (None if not monitored).
        test: the `test` CLI: its model holds the checkpoint's weights and calibrations, its
            trainer and data module can test again.
        metrics: what `test` logged.
        seconds: wall time of fit + test.
    """

    name: str
    checkpoint: str
    best_val_top1: float | None
    test: AdaptiveViTCLI
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def logger_args(runs: Path, name: str) -> list[str]:
    """Both loggers (TensorBoard first: its folder is the run's log_dir) into runs/<name>.

    (``--trainer.logger.init_args.save_dir`` would move only the last logger of the config's list.)
    """
    loggers = [
        {"class_path": f"lightning.pytorch.loggers.{cls}", "init_args": {"save_dir": str(runs), "name": name}}
        for cls in ("TensorBoardLogger", "CSVLogger")
    ]
    return ["--trainer.logger", json.dumps(loggers)]


def fit_and_test(name: str, config: Path, runs: Path, extra: list[str]) -> DemoRun:
    """`fit` the config, then `test` its best checkpoint (the last one without a monitored metric).

    Args:
        name: the demo's name; its runs go to runs/demo_<name>/version_N (the configs' names).
        config: the YAML config.
        runs: root folder of the runs.
        extra: further CLI arguments for both `fit` and `test` (e.g. init_from, short epochs).
    """
    common = ["--config", str(config), "--trainer.default_root_dir", str(runs),
              *logger_args(runs, f"demo_{name}"), *extra]
    start = time.time()
    fit = main(["fit", *common])
    checkpointing = fit.trainer.checkpoint_callback
    best = checkpointing.best_model_path or checkpointing.last_model_path
    score = checkpointing.best_model_score if checkpointing.best_model_path else None
    test = main(["test", *common, "--ckpt_path", best])
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    return DemoRun(name, best, None if score is None else float(score), test, metrics, round(time.time() - start, 1))


def run_demos(runs: Path, only: list[str] | None = None,
              extra: Callable[[str], list[str]] = lambda name: []) -> Iterator[DemoRun]:
    """Fit and test each demo in order, MIA-Former from the static run's checkpoint.

    Args:
        runs: root folder of the runs.
        only: demo names to run (default: every config present). MIA-Former needs ``static``.
        extra: further CLI arguments per demo name.
    """
    static_ckpt = None
    for name, config, needs_static in DEMOS:
        path = REPO / config
        if not path.exists() or (only and name not in only):
            continue
        arguments = extra(name)
        if needs_static:
            if static_ckpt is None:
                print(f"skipping {name}: it starts from the static demo model, which did not run")
                continue
            arguments = ["--model.init_args.init_from", static_ckpt, *arguments]
        print(f"\n=== demo: {name} ({config}) ===", flush=True)
        run = fit_and_test(name, path, runs, arguments)
        if name == "static":
            static_ckpt = run.checkpoint
        yield run


def summary(run: DemoRun) -> dict[str, Any]:
    """The demo table's row of one run."""
    return {
        "method": run.name,
        "checkpoint": run.checkpoint,
        "test_top1": run.metrics.get("test/top1"),
        "test_gflops": run.metrics.get("test/gflops"),
        "static_gflops": run.test.model.net.static_gflops(),
        "seconds": run.seconds,
        "metrics": run.metrics,
    }


def main_demo() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="runs/demo", help="where runs are written")
    parser.add_argument("--only", nargs="*", help="demo names to run (default: all present)")
    args = parser.parse_args()
    runs = Path(args.runs).resolve()
    results = [summary(run) for run in run_demos(runs, args.only)]
    (runs / "demo_results.json").write_text(json.dumps(results, indent=2))
    print("\nDemo results (test split of the bundled digits, 500 images):")
    print(f"{'method':<8} {'top-1':>7} {'GFLOPs/img':>11} {'vs static':>10} {'time':>7}")
    for r in results:
        print(f"{r['method']:<8} {100 * r['test_top1']:6.1f}% {r['test_gflops']:11.4f} "
              f"{r['test_gflops'] / r['static_gflops']:9.2f}x {r['seconds']:6.0f}s")
    print(f"\nruns, logs and checkpoints: {runs}; table: {runs / 'demo_results.json'}")


if __name__ == "__main__":
    main_demo()
