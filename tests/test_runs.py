"""Run folders and checkpoints: `predict`'s CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import FAST_TRAINER, REPO, TINY_VIT

STATIC = ["--config", str(REPO / "configs/demo/static.yaml")]


def test_predict_writes_a_csv_in_the_run_folder(run_cli, image_folder: Path) -> None:
    data = ["--data.init_args.dataset", "folder", "--data.init_args.root", str(image_folder),
            "--data.init_args.auto_augment", "null"]
    run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER, *data)
    cli = run_cli("predict", *STATIC, *TINY_VIT, *FAST_TRAINER, *data, "--ckpt_path",
                  "runs/demo_static/version_0/checkpoints/last.ckpt")
    with open(Path(cli.trainer.log_dir) / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 24 and [int(r["index"]) for r in rows] == list(range(24))  # the val split, in order
    assert all(Path(r["path"]).is_file() and Path(r["path"]).parent.parent == image_folder / "val" for r in rows)
    assert {r["class"] for r in rows} <= {"class_0", "class_1", "class_2"}
    assert all(r["class"] == f"class_{r['class_index']}" and 0 < float(r["confidence"]) <= 1 for r in rows)
    assert {r["exit"] for r in rows} == {"final"}
    assert float(rows[0]["gflops"]) == pytest.approx(cli.model.net.static_gflops(), rel=1e-5)
