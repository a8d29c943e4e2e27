"""Run folders and checkpoints: `last.ckpt` after every epoch, `--ckpt_path last|best` in a new
process, files that cannot be loaded, runs without a logger, and `predict`'s CSV."""

from __future__ import annotations

import csv
import datetime
import hashlib
import sys
from pathlib import Path

import pytest
import torch

from adaptive_vit.cli import main
from conftest import FAST_TRAINER, REPO, TINY_VIT

STATIC = ["--config", str(REPO / "configs/demo/static.yaml")]
# The weights do not move: val/top1 of the first epoch is never improved on.
FLAT = ["--model.init_args.lr", "1e-8", "--model.init_args.warmup_lr", "1e-9", "--model.init_args.min_lr", "1e-9"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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


@pytest.fixture
def in_plateau(plateau: Path, monkeypatch: pytest.MonkeyPatch):
    """Run `adaptive-vit ARGS...` (the plateau run's config) in-process inside the plateau folder."""
    monkeypatch.chdir(plateau)
    monkeypatch.setattr(sys, "argv", ["adaptive-vit"])

    def run(subcommand: str, *args: str):
        return main([subcommand, *STATIC, *TINY_VIT, *FAST_TRAINER, "--trainer.max_epochs", "3", *FLAT, *args])

    return run


def test_last_ckpt_holds_every_epoch(plateau: Path) -> None:
    checkpoints = plateau / "runs/demo_static/version_0/checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 9)  # the third epoch's end, not the first's
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-000.ckpt", "last.ckpt"]


@pytest.mark.parametrize(("subcommand", "ckpt_path", "loaded"), [
    ("test", "best", "best-000.ckpt"), ("validate", "last", "last.ckpt"), ("predict", "last", "last.ckpt"),
])
def test_ckpt_path_last_and_best_name_the_newest_run(in_plateau, plateau: Path, recwarn: pytest.WarningsRecorder,
                                                      subcommand: str, ckpt_path: str, loaded: str) -> None:
    cli = in_plateau(subcommand, "--ckpt_path", ckpt_path)
    assert Path(cli.trainer.ckpt_path) == (plateau / "runs/demo_static/version_0/checkpoints" / loaded).resolve()
    # the checkpoint's record of the fit's checkpoint folder is of no use here: no warning about it
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def test_fit_ckpt_path_last_on_a_finished_run_says_so(in_plateau, caplog: pytest.LogCaptureFixture) -> None:
    cli = in_plateau("fit", "--ckpt_path", "last")
    assert cli.trainer.global_step == 9
    assert "nothing left to train" in caplog.text


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_ckpt_path_last_without_a_run_is_the_no_weights_error(run_cli, tmp_path: Path, subcommand: str) -> None:
    with pytest.raises(ValueError, match=rf"{subcommand}: no weights to evaluate \(--ckpt_path last: no checkpoint "
                                         r"of this config, looked for runs/demo_static/version_\*"):
        run_cli(subcommand, *STATIC, *TINY_VIT, *FAST_TRAINER, "--ckpt_path", "last")
    assert not (tmp_path / "runs").exists()


def unloadable(tmp_path: Path, kind: str) -> Path:
    """A checkpoint file cut short by an interrupted copy, not a checkpoint at all, or one that
    holds a Python object a weights-only load refuses."""
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(4096)}, "epoch": 0}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "corrupt":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    else:
        torch.save({"state_dict": {}, "created": datetime.date(2020, 1, 1)}, path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "unsafe"])
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_unloadable_ckpt_path_is_one_message_before_anything_is_written(run_cli, tmp_path: Path, kind: str,
                                                                         subcommand: str) -> None:
    path = unloadable(tmp_path, kind)
    with pytest.raises(ValueError, match=rf"--ckpt_path: could not load '{path}' safely"):
        run_cli(subcommand, *STATIC, *TINY_VIT, *FAST_TRAINER, "--ckpt_path", str(path))
    assert not (tmp_path / "runs").exists()


def test_runs_without_a_logger_get_their_own_folders(run_cli, tmp_path: Path) -> None:
    """`--trainer.logger false` with the config's callbacks (a LearningRateMonitor among them): each
    run writes in a version folder of its own, and a resumed one in the folder of the run it continues."""
    at = FAST_TRAINER.index("--trainer.callbacks")
    args = [*STATIC, *TINY_VIT, *FAST_TRAINER[:at], *FAST_TRAINER[at + 2:], "--trainer.logger", "false"]
    runs = tmp_path / "runs/StaticViTLitModule"
    first = run_cli("fit", *args)
    assert Path(first.trainer.log_dir) == Path("runs/StaticViTLitModule/version_0")
    before = snapshot(runs / "version_0")
    run_cli("fit", *args)
    assert snapshot(runs / "version_0") == before  # nothing of the first run overwritten
    for run in ("version_0", "version_1"):
        assert {"config.yaml", "flops_budget.csv", "checkpoints/last.ckpt"} <= set(snapshot(runs / run))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["StaticViTLitModule"]

    resumed = run_cli("fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert Path(resumed.trainer.log_dir) == Path("runs/StaticViTLitModule/version_1")
    assert torch.load(runs / "version_1/checkpoints/last.ckpt", weights_only=True)["epoch"] == 1


def test_predict_writes_a_csv_in_the_run_folder(run_cli, image_folder: Path) -> None:
    data = ["--data.init_args.dataset", "folder", "--data.init_args.root", str(image_folder),
            "--data.init_args.auto_augment", "null"]
    run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER, *data)
    cli = run_cli("predict", *STATIC, *TINY_VIT, *FAST_TRAINER, *data, "--ckpt_path", "last")
    with open(Path(cli.trainer.log_dir) / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 24 and [int(r["index"]) for r in rows] == list(range(24))  # the val split, in order
    assert all(Path(r["path"]).is_file() and Path(r["path"]).parent.parent == image_folder / "val" for r in rows)
    assert {r["class"] for r in rows} <= {"class_0", "class_1", "class_2"}
    assert all(r["class"] == f"class_{r['class_index']}" and 0 < float(r["confidence"]) <= 1 for r in rows)
    assert {r["exit"] for r in rows} == {"final"}
    assert float(rows[0]["gflops"]) == pytest.approx(cli.model.net.static_gflops(), rel=1e-5)
