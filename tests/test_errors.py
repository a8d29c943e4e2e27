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


@pytest.fixture
def console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture):
    """`adaptive-vit ARGS...` as the command line runs it (`main()`, arguments from sys.argv) inside
    tmp_path, for a command that fails: its exit status and its error, checked to be one line."""
    from adaptive_vit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTIVE_VIT_DEBUG", raising=False)

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["adaptive-vit", *args])
        with pytest.raises(SystemExit) as stopped:
            main()
        stderr = capfd.readouterr().err
        # Lightning's own lines ("Seed set to 0", ...) may come first; the error is one last line
        errors = [line for line in stderr.splitlines() if "error" in line.lower() or "usage" in line]
        assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
        assert "Traceback" not in stderr
        return stopped.value.code, errors[0]

    return run


def test_missing_config_file_from_the_console(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "adaptive_vit", "fit", "--config", "missing.yaml"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"adaptive-vit: error: --config {tmp_path / 'missing.yaml'}: the file does "
                                  "not exist. Check the path (a relative path starts from the current folder, "
                                  f"{tmp_path}).")


BAD_YAML = "trainer:\n  max_epochs: 3\n  devices: [1\nmodel: x\n"


def mistyped(option: str, meant: str, where: str = "--help") -> str:
    return f"unknown option {option}. Did you mean {meant}? See the options with `adaptive-vit fit {where}`."


@pytest.mark.parametrize(("args", "message"), [
    (["--config", "bad.yaml"], "bad.yaml, line 4, column 6: expected ',' or ']', but got ':' (while parsing a flow "
                               "sequence, from line 3). Fix the YAML syntax there."),
    ([*STATIC, "--model.init_args.treshold", "0.5"],
     mistyped("model.init_args.treshold", "model.init_args.thresholds", "--model.help StaticViTLitModule")),
    ([*STATIC, "--config", "typo.yaml"], mistyped("trainer.max_epoch", "trainer.max_epochs")),
    ([*STATIC, "--checkpoint.monitr", "val/top5"], mistyped("checkpoint.monitr", "checkpoint.monitor")),
    ([*STATIC, "--trainer.max_epochs", "abc"],
     "trainer.max_epochs: expected int or null, got 'abc'. Fix the value on the command line (--trainer.max_epochs) "
     "or in the config file."),
    ([*STATIC, "--model", "StaticVitLitModule"],
     "model: no class 'StaticVitLitModule'. Did you mean StaticViTLitModule? Give a class name this tool knows or a "
     "full import path (package.module.Class)."),
])
def test_configuration_mistakes_are_one_message_naming_the_fix(console, tmp_path: Path, args: list[str],
                                                               message: str) -> None:
    """A YAML syntax error, a mistyped key (on the command line or in a config), a wrong type and an
    unknown class: one line naming the option and the fix, exit status 2, no usage block."""
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_epoch: 3\n")
    assert console("fit", *args) == (2, f"adaptive-vit: error: {message}")


def test_debug_keeps_jsonargparse_s_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptive_vit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTIVE_VIT_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["adaptive-vit", "fit", *STATIC, "--trainer.max_epochs", "abc"])
    with pytest.raises(ValueError, match="trainer.max_epochs: expected int") as raised:
        main()
    assert "Does not validate against any of the Union subtypes" in str(raised.value.__cause__)


def test_thresholds_outside_0_1(console) -> None:
    code, error = console("fit", *STATIC, *TINY_VIT, *FAST_TRAINER, "--model.init_args.thresholds", "[1.5]")
    assert code == 2 and error.startswith("adaptive-vit: error: thresholds [1.5]: [1.5] outside [0, 1].")


def test_evaluating_without_weights_exits_2(console) -> None:
    code, error = console("test", *STATIC, *TINY_VIT, *FAST_TRAINER)
    assert code == 2 and error.startswith("adaptive-vit: error: test: no weights to evaluate.")


@pytest.mark.parametrize(("config", "value"), [
    ("mia", ["--model.init_args.target_gflops", "-0.01"]),
    ("static", ["--trainer.callbacks", "[{class_path: FlopsBudgetTracker, init_args: {target_gflops: -1}}]"]),
])
def test_negative_target_gflops_is_refused(run_cli, config: str, value: list[str]) -> None:
    with pytest.raises(ValueError, match="target_gflops must be positive"):
        run_cli("fit", "--config", str(REPO / f"configs/demo/{config}.yaml"), *TINY_VIT, *FAST_TRAINER, *value)


def test_unknown_backbone_names_close_ones(run_cli) -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'deit_smal'.*deit_small_patch16_224"):
        run_cli("fit", *STATIC, *FAST_TRAINER, "--model.init_args.backbone.name", "deit_smal")


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
