"""Interrupted fits lose nothing: stopped mid-epoch (Ctrl+C, SIGTERM) and continued with
`fit --ckpt_path last`, a run ends with the weights, thresholds and metrics of an uninterrupted
run with the same seed, in the same run folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from conftest import REPO

# Tiny, and every source of randomness on: augmentation (crop), Mixup/CutMix and label smoothing
# on the device, drop path; MIA-Former adds Gumbel noise and sampled policies.
TINY = [
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.num_sanity_val_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.callbacks", "[]",
    "--data.init_args.num_workers", "0",
    "--data.init_args.batch_size", "8",
    "--data.init_args.mixup", "0.8",
    "--data.init_args.cutmix", "1.0",
    "--data.init_args.label_smoothing", "0.1",
    "--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}",
    "--model.init_args.backbone.drop_path_rate", "0.1",
]
CALIBRATE = ["--trainer.callbacks+=ThresholdCalibration", "--trainer.callbacks.budget_fractions=[0.7]",
             "--trainer.callbacks.plot=false", "--trainer.callbacks.curve_points=3"]


class StopAt(Callback):
    """Interrupts a fit at global step `step`: Ctrl+C in the middle of the batch (`interrupt`),
    or a SIGTERM to this process as a cluster's preemption sends it (`sigterm`; Lightning
    finishes the batch, then stops)."""

    def __init__(self, step: int, how: str = "interrupt") -> None:
        self.step, self.how = step, how

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            if self.how == "interrupt":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)


def stop_at(step: int, how: str) -> list[str]:
    return ["--trainer.callbacks+=test_resume.StopAt", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.how={how}"]


def interrupted(run_cli, args: list[str], step: int, how: str) -> None:
    """Run a fit that is stopped at `step`, as the command line would see it."""
    with pytest.raises(SystemExit):  # Ctrl+C: exit status 1; SIGTERM: Lightning's SIGTERMException
        run_cli("fit", *args, *stop_at(step, how))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Lightning leaves its handler when it stops


def final_state(cli) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    return weights, {k: v.detach().clone() for k, v in cli.trainer.callback_metrics.items()}


def assert_same_run(expected, resumed_cli) -> None:
    weights, metrics = expected
    got_weights, got_metrics = final_state(resumed_cli)
    assert weights.keys() == got_weights.keys()
    for key in weights:
        torch.testing.assert_close(got_weights[key], weights[key], rtol=0, atol=1e-6, msg=key)
    # the last epoch's validation metrics and the last step's losses (the uninterrupted run also
    # keeps metrics only logged in earlier epochs, e.g. a stage's own loss)
    assert any(key.startswith("val/") for key in got_metrics) and got_metrics.keys() <= metrics.keys()
    for key in got_metrics:
        torch.testing.assert_close(got_metrics[key], metrics[key], rtol=0, atol=1e-6, msg=key)


def config(method: str) -> list[str]:
    return ["--config", str(REPO / f"configs/demo/{method}.yaml")]


@pytest.mark.parametrize(("method", "extra", "stops"), [
    # stopped twice: Ctrl+C in the first epoch, then the resumed run preempted in the second
    ("static", [], [(1, "interrupt"), (2, "sigterm")]),
    # after CF-ViT's selection epoch, with calibrated thresholds
    ("cfvit", CALIBRATE + ["--model.init_args.selection_epoch", "1"], [(3, "interrupt")]),
    # last.ckpt written after every step (on_train_batch_end): the preempted step is in it
    ("dvt", CALIBRATE + ["--checkpoint.every_n_train_steps", "1", "--checkpoint.monitor", "null"],
     [(2, "sigterm")]),
])
def test_resume_matches_uninterrupted(run_cli, tmp_path: Path, method: str, extra: list[str],
                                      stops: list[tuple[int, str]]) -> None:
    args = [*config(method), *TINY, "--trainer.max_epochs", "2", *extra]  # 2 epochs of 2 batches
    expected = final_state(run_cli("fit", *args))
    run = tmp_path / f"runs/demo_{method}/version_1"
    interrupted(run_cli, args, *stops[0])
    for step, how in stops[1:]:
        interrupted(run_cli, [*args, "--ckpt_path", "last"], step, how)
    stopped_rows = (run / "metrics.csv").read_text().splitlines()
    assert (run / "checkpoints/last.ckpt").is_file()
    if "--checkpoint.monitor" not in extra:  # the checkpoint of the interruption is no "best"
        assert not list(run.glob("checkpoints/best-001*"))

    resumed = run_cli("fit", *args, "--ckpt_path", "last")
    assert_same_run(expected, resumed)
    if method != "static":  # calibrated thresholds travel with the model
        assert resumed.model.exit_policy.calibrations and torch.equal(
            resumed.model.net.exit_thresholds, expected[0]["net.exit_thresholds"])
    # one run folder: the interrupted runs' logs kept, the resumed run's appended
    assert tmp_path / resumed.trainer.log_dir == run and not (run.parent / "version_2").exists()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[1:len(stopped_rows)] == stopped_rows[1:] and len(rows) > len(stopped_rows)
    assert len(list(run.glob("events.out.tfevents*"))) == len(stops) + 1
    assert sorted(p.name for p in run.glob("config*.yaml")) == [
        *(f"config-resumed-{n}.yaml" for n in range(1, len(stops) + 1)), "config.yaml"]


def test_mia_resume_across_stage_boundaries(run_cli) -> None:
    """Stages [1, 2, 3 joint] of one epoch (2 batches) each: stopped at the last batch of stage 1,
    resumed and stopped after the first batch of stage 2, resumed through the A2C stage's
    controller re-initialisation to the end."""
    args = [*config("mia"), *TINY, "--trainer.max_epochs", "3", "--model.init_args.stage_epochs", "[1, 1, 0, 1]",
            "--model.init_args.target_gflops", "0.002"]
    expected = final_state(run_cli("fit", *args))
    interrupted(run_cli, args, 1, "interrupt")
    interrupted(run_cli, [*args, "--ckpt_path", "last"], 2, "sigterm")
    assert_same_run(expected, run_cli("fit", *args, "--ckpt_path", "last"))


def test_ckpt_path_last_without_a_previous_run(run_cli, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no checkpoint to resume, looked for "
                       r"runs/demo_static/version_\*/checkpoints/last.ckpt"):
        run_cli("fit", *config("static"), *TINY, "--ckpt_path", "last")
    assert not (tmp_path / "runs/demo_static").exists()


def test_console_preempted_exit_status(tmp_path: Path) -> None:
    """On the command line a SIGTERM-stopped fit exits 143 (as if killed), not 0 (Lightning's own)."""
    args = [*config("static"), *TINY, "--trainer.max_epochs", "1", *stop_at(1, "sigterm")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "adaptive_vit", "fit", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert "stopped by SIGTERM; continue with the same command and --ckpt_path last" in done.stderr
    assert (tmp_path / "runs/demo_static/version_0/checkpoints/last.ckpt").is_file()
