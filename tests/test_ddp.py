"""Multi-process code paths on CPU: 2-process DDP (gloo) for `fit` and for threshold calibration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

from adaptive_vit.callbacks import ThresholdCalibration
from conftest import FAST_TRAINER, REPO, TINY_VIT
from test_callbacks import data_root, datamodule, tiny_model, trainer  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def test_calibration_under_ddp_equals_one_process(tmp_path, data_root):
    """21 validation images over 2 ranks: the sampler pads one; calibration must drop it."""
    reports = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        run = tmp_path / f"devices{devices}"
        calibration = ThresholdCalibration(budget_fractions=[0.5, 0.8], match_accuracy=True, curve_points=6,
                                           save_checkpoint=False, plot=False)
        validate = trainer(run, [calibration], devices=devices, strategy=strategy,
                           logger=CSVLogger(run, name="run", version=0))
        validate.validate(tiny_model(), datamodule(data_root, batch_size=4))
        reports[devices] = json.loads((run / "run" / "version_0" / "thresholds.json").read_text())
    one, two = reports[1], reports[2]
    assert one["budgets"]["match_accuracy"]["num_images"] == 21
    assert two["budgets"] == one["budgets"]
    assert two["curve"] == one["curve"]


def test_fit_with_ddp_on_two_cpu_processes(tmp_path, image_folder):
    """`adaptive-vit fit` with strategy ddp (Lightning launches the second process) to the end,
    with the FLOPs tracker and validation-time robustness reducing over both ranks."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "FlopsBudgetTracker"},
        {"class_path": "RobustnessEvaluation",
         "init_args": {"attacks": [{"name": "FGSM", "eps": 0.03}], "every_n_val_epochs": 1, "num_batches": 1}},
    ]}}))
    args = [
        "fit", "--config", str(REPO / "configs/demo/static.yaml"), *TINY_VIT, *FAST_TRAINER,
        "--data.init_args.dataset", "folder", "--data.init_args.root", str(image_folder),
        "--data.init_args.batch_size", "4",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "2",
        "--config", str(callbacks),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "adaptive_vit", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "runs").glob("*/version_0")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / "runs").glob("*/version_1"))  # both ranks wrote into one run folder
    metrics = (run / "metrics.csv").read_text()
    assert "val/robust/fgsm_eps0.03/top1" in metrics and "val/flops/ratio" in metrics
    flops_rows = (run / "flops_budget.csv").read_text().splitlines()
    assert len(flops_rows) == 1 + 4  # header + (val, train) x 2 epochs, written by rank 0 only
