"""Bad input, clear answers: each mistake ends with a message naming the problem and the fix,
and never costs the output of an earlier run."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from adaptive_vit.data import UnreadableImageWarning
from conftest import FAST_TRAINER, REPO, TINY_VIT, make_image_folder

STATIC = ["--config", str(REPO / "configs/demo/static.yaml")]


def folder(root: Path) -> list[str]:
    return ["--data.init_args.dataset", "folder", "--data.init_args.root", str(root),
            "--data.init_args.auto_augment", "null"]


def snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_missing_config_file_from_the_console(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "adaptive_vit", "fit", "--config", "missing.yaml"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert "missing.yaml" in run.stderr and "does not exist" in run.stderr
    assert "Traceback" not in run.stderr


def test_unknown_backbone_names_close_ones(run_cli) -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'deit_smal'.*deit_small_patch16_224"):
        run_cli("fit", *STATIC, *FAST_TRAINER, "--model.init_args.backbone", "deit_smal")


def test_checkpoint_of_another_method_loses_nothing(run_cli, tmp_path: Path) -> None:
    run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER)
    run = tmp_path / "runs/demo_static/version_0"
    before = snapshot(run)
    with pytest.raises(ValueError, match="written by StaticViTLitModule, but the configured model is CFViTLitModule"):
        run_cli("test", "--config", str(REPO / "configs/demo/cfvit.yaml"), *FAST_TRAINER,
                "--ckpt_path", str(run / "checkpoints/last.ckpt"))
    assert snapshot(run) == before  # the earlier run's files are untouched
    assert not (tmp_path / "runs/demo_cfvit").exists()  # nor a run folder of the failed test left behind


def test_budget_below_the_cheapest_exit(run_cli) -> None:
    callbacks = "[{class_path: ThresholdCalibration, init_args: {budgets_gflops: [1.0e-6]}}]"
    with pytest.raises(ValueError, match="below the cheapest"):
        run_cli("fit", "--config", str(REPO / "configs/demo/cfvit.yaml"), *FAST_TRAINER,
                "--trainer.callbacks", callbacks)


def test_corrupt_image_is_reported_and_skipped(run_cli, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", per_class=4)
    broken = root / "train/class_1/broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.warns(UnreadableImageWarning, match="broken.png"):
        run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER, *folder(root),
                "--data.init_args.batch_size", "4", "--trainer.limit_train_batches", "4")
    assert (tmp_path / "runs/demo_static/version_0/checkpoints/last.ckpt").is_file()


def test_empty_class_folder_is_named(run_cli, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images")
    (root / "train/class_9").mkdir()
    (root / "val/class_9").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="class_9"):
        run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER, *folder(root))


@pytest.mark.parametrize(("config", "value"), [
    ("mia", ["--model.init_args.target_gflops", "-0.01"]),
    ("static", ["--trainer.callbacks", "[{class_path: FlopsBudgetTracker, init_args: {target_gflops: -1}}]"]),
])
def test_negative_target_gflops_is_refused(run_cli, config: str, value: list[str]) -> None:
    with pytest.raises(ValueError, match="target_gflops must be positive"):
        run_cli("fit", "--config", str(REPO / f"configs/demo/{config}.yaml"), *TINY_VIT, *FAST_TRAINER, *value)
