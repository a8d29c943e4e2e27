"""The `adaptive-vit` CLI end to end: fit → test on the saved checkpoint, configs, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adaptive_vit.trainer import benchmark_row
from conftest import FAST_TRAINER, REPO, TINY_VIT

STATIC = ["--config", str(REPO / "configs/demo/static.yaml")]


def folder_data(root: Path) -> list[str]:
    return ["--data.init_args.dataset", "folder", "--data.init_args.root", str(root),
            "--data.init_args.auto_augment", "null"]


def test_fit_then_test_on_class_folders(run_cli, image_folder: Path, tmp_path: Path) -> None:
    run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER, *folder_data(image_folder))
    run = tmp_path / "runs/demo_static/version_0"
    assert (run / "checkpoints/last.ckpt").is_file()
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["inference_mode"] is False
    assert yaml.safe_load((run / "hparams.yaml").read_text())["num_classes"] == 3  # linked from data

    cli = run_cli("test", *STATIC, *TINY_VIT, *FAST_TRAINER, *folder_data(image_folder),
                  "--ckpt_path", str(run / "checkpoints/last.ckpt"))
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["test/top1"]) <= 1.0
    assert float(metrics["test/gflops"]) == pytest.approx(cli.model.net.static_gflops(), rel=1e-5)


def test_saved_config_reproduces_the_run(run_cli, image_folder: Path, tmp_path: Path) -> None:
    run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER, *folder_data(image_folder))
    first = tmp_path / "runs/demo_static/version_0"
    cli = run_cli("fit", "--config", str(first / "config.yaml"))
    second = Path(cli.trainer.log_dir)
    assert second != first
    import torch
    a = torch.load(first / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(second / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:  # same seed, same data, same config: the same weights
        torch.testing.assert_close(a[key], b[key])


def test_demo_data_fit_and_test(run_cli, tmp_path: Path) -> None:
    run_cli("fit", *STATIC, *FAST_TRAINER)
    cli = run_cli("test", *STATIC, *FAST_TRAINER, "--ckpt_path",
                  str(tmp_path / "runs/demo_static/version_0/checkpoints/last.ckpt"))
    assert "test/top1" in cli.trainer.callback_metrics


def test_progress_bar_off_drops_the_configured_one(run_cli, image_folder: Path) -> None:
    at = FAST_TRAINER.index("--trainer.callbacks")
    configured_callbacks = FAST_TRAINER[:at] + FAST_TRAINER[at + 2:]  # the config's, RichProgressBar first
    cli = run_cli("fit", *STATIC, *TINY_VIT, *configured_callbacks, *folder_data(image_folder))
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert cli.trainer.progress_bar_callback is None and "RichProgressBar" not in names
    assert {"LearningRateMonitor", "FlopsBudgetTracker", "ThresholdCalibration"} <= names
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 1  # the fit ran to its end


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_without_weights_is_an_error(run_cli, subcommand: str) -> None:
    with pytest.raises(ValueError, match=f"{subcommand}: no weights to evaluate. Pass --ckpt_path"):
        run_cli(subcommand, *STATIC, *TINY_VIT, *FAST_TRAINER)


def test_first_screen_carries_what_concerns_the_user(run_cli, monkeypatch: pytest.MonkeyPatch,
                                                    capfd: pytest.CaptureFixture,
                                                    recwarn: pytest.WarningsRecorder) -> None:
    """What `make demo` shows first: the model with this tool's GFLOPs (not Lightning's FLOPs column,
    0 for every module), and none of Lightning's notes about itself: its tip about a logging
    service, its warning about `args` (benchmarks/demo.py calls `main(args)` with its own command
    line), the deprecation of an API its internals call."""
    monkeypatch.setattr(sys, "argv", ["benchmarks/demo.py", "--runs", "runs/demo"])
    cli = run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER)
    shown = "".join(capfd.readouterr())
    gflops = cli.model.net.static_gflops()
    assert f"GFLOPs per image: final {gflops:.4g}" in shown
    assert "FLOPs ┃" not in shown and "Total FLOPs" not in shown and "litlogger" not in shown
    notes = [str(w.message) for w in recwarn]
    assert not [n for n in notes if "args parameter" in n or "LeafSpec" in n], notes


def test_init_from_missing_file_and_wrong_layout(run_cli, tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match="init_from: no such file"):
        run_cli("test", *STATIC, *FAST_TRAINER, "--model.init_args.init_from", str(tmp_path / "nope.ckpt"))
    import torch
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit StaticViT: missing keys"):
        run_cli("test", *STATIC, *FAST_TRAINER, "--model.init_args.init_from", str(tmp_path / "other.pth"))


def test_print_config(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "adaptive_vit", "fit", *STATIC, "--print_config"],
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    config = yaml.safe_load(out)
    assert config["model"]["class_path"].endswith("StaticViTLitModule")
    assert config["data"]["init_args"]["dataset"] == "demo"
    assert config["checkpoint"]["monitor"] == "val/top1"


def test_flops_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adaptive_vit", "flops", "--config", str(REPO / "configs/static_deit.yaml"),
         "--format", "json"], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    report = json.loads(out[out.index("{"):])
    assert report["model"] == "StaticViT"
    assert report["static_gflops"] == pytest.approx(4.608, rel=5e-3)
    assert [e["name"] for e in report["exits"]] == ["final"]
    assert report["exits"][0]["cumulative_gflops"] == pytest.approx(report["static_gflops"])
    assert report["params_m"] == pytest.approx(22.05, rel=1e-2)


def test_benchmark_reports_ratios(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run_cli("benchmark", *STATIC, *TINY_VIT, "--batch_sizes", "[2]", "--repeats", "3", "--warmup", "0",
            "--output", str(out), "--trainer.accelerator", "cpu")
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["static", "adaptive"]
    assert all(r["images_per_s"] > 0 and r["threads"] >= 1 for r in rows)
    assert rows[1]["flops_reduction"] == pytest.approx(1.0)
    assert rows[0]["speedup_spread"] == [1.0, 1.0]  # the static model against itself, turn by turn
    low, high = rows[1]["efficiency_spread"]
    assert low <= high and low == pytest.approx(rows[1]["speedup_spread"][0] / rows[1]["flops_reduction"])


def test_benchmark_row_spread_is_turn_by_turn() -> None:
    """The spread pairs each turn's static and adaptive times (not the extremes of each)."""
    row = benchmark_row("adaptive", 4, turns=[1.0, 2.0, 4.0], static_turns=[2.0, 2.0, 4.0], gflops=1.0,
                        static_gflops=2.0)
    assert row["speedup"] == pytest.approx(1.0)  # medians 2 / 2
    assert row["speedup_spread"] == [1.0, 2.0]  # turns: 2/1, 2/2, 4/4
    assert row["efficiency_spread"] == [0.5, 1.0]
    assert row["latency_ms"] == pytest.approx(2000.0) and row["images_per_s"] == pytest.approx(2.0)


def test_dockerfile_installs_the_package_and_entry_point() -> None:
    docker = (REPO / "Dockerfile").read_text()
    assert docker.splitlines()[[l.startswith("FROM") for l in docker.splitlines()].index(True)].startswith("FROM pytorch/pytorch:")
    assert "pip install --no-cache-dir ." in docker and "--no-deps torchattacks" in docker
    assert 'ENTRYPOINT ["adaptive-vit"]' in docker
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'adaptive-vit = "adaptive_vit.cli:main"' in pyproject


def test_console_errors_are_one_message_not_a_traceback(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "adaptive_vit", "test", *STATIC, "--model.init_args.init_from",
         str(tmp_path / "nope.ckpt")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert "init_from: no such file" in run.stderr and "Traceback" not in run.stderr


def test_ema_weight_averaging_from_yaml(run_cli, image_folder: Path, tmp_path: Path) -> None:
    """Optional EMA of the weights is Lightning's callback, configured from the CLI/YAML."""
    import torch
    ema = "[{class_path: lightning.pytorch.callbacks.EMAWeightAveraging, init_args: {decay: 0.5}}]"
    cli = run_cli("fit", *STATIC, *TINY_VIT, *FAST_TRAINER, *folder_data(image_folder),
                  "--trainer.callbacks", ema)
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EMAWeightAveraging")
    averaged = callback._average_model.module.net.backbone.head.weight
    assert averaged.shape == cli.model.net.backbone.head.weight.shape
    saved = torch.load(tmp_path / "runs/demo_static/version_0/checkpoints/last.ckpt", weights_only=True)
    # the checkpoint holds the averaged weights (Lightning swaps them in when saving)
    torch.testing.assert_close(saved["state_dict"]["net.backbone.head.weight"], averaged)


@pytest.mark.parametrize("method", ["cfvit", "dvt", "mia"])
def test_pure_bfloat16_test_run(run_cli, tmp_path: Path, method: str) -> None:
    """`--trainer.precision bf16-true` converts the whole module, metric states included: the
    robustness attacks' float32 images must still go in, the cost bookkeeping stay float32, and
    the mean GFLOPs add up in float32 (in bfloat16 it read 0.2 % off on 32 images)."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "RobustnessEvaluation", "init_args": {"attacks": [{"name": "FGSM", "eps": 0.03}]}},
    ]}}))
    small = ["--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}"]
    if method == "cfvit":
        small += ["--model.init_args.cls_attn_start", "0"]
    if method == "mia":
        small += ["--model.init_args.stage_epochs", "[1, 1, 1, 1]", "--trainer.max_epochs", "4"]
    config = ["--config", str(REPO / f"configs/demo/{method}.yaml"), *FAST_TRAINER, *small]
    run_cli("fit", *config)
    ckpt = tmp_path / f"runs/demo_{method}/version_0/checkpoints/last.ckpt"
    args = [*config, "--config", str(callbacks), "--trainer.precision", "bf16-true",
            "--model.init_args.init_from", str(ckpt)]
    if method != "mia":  # every image at the first exit: a known mean
        args += ["--model.init_args.thresholds", "[0.0, 0.0]" if method == "dvt" else "[0.0]"]
    cli = run_cli("test", *args)
    metrics, net = cli.trainer.callback_metrics, cli.model.net
    assert next(net.parameters()).dtype == torch.bfloat16
    assert 0.0 <= float(metrics["test/robust/fgsm_eps0.03/top1"]) <= 1.0
    if method == "mia":
        assert 0.0 < float(metrics["test/gflops"]) <= net.exit_gflops()[0]
    else:
        assert float(metrics["test/gflops"]) == pytest.approx(net.exit_gflops()[0], rel=1e-6)
