"""Run folders and checkpoints: `last.ckpt` after every epoch and `predict`'s CSV."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from adaptive_vit.cli import main
from conftest import FAST_TRAINER, REPO, TINY_VIT

STATIC = ["--config", str(REPO / "configs/demo/static.yaml")]
# The weights do not move: val/top1 of the first epoch is never improved on.
FLAT = ["--model.init_args.lr", "1e-8", "--model.init_args.warmup_lr", "1e-9", "--model.init_args.min_lr", "1e-9"]


@pytest.fixture(scope="module")
def plateau(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one fit of 3 epochs (3 steps each) whose val/top1 does not improve after
    the first epoch: runs/demo_static/version_0, with best-000.ckpt and last.ckpt."""
    folder = tmp_path_factory.mktemp("plateau")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(sys, "argv", ["adaptive-vit"])
        main(["fit", *STATIC, *TINY_VIT, *FAST_TRAINER, "--trainer.max_epochs", "3", *FLAT])
    return folder


def test_last_ckpt_holds_every_epoch(plateau: Path) -> None:
    checkpoints = plateau / "runs/demo_static/version_0/checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 9)  # the third epoch's end, not the first's
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-000.ckpt", "last.ckpt"]


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
