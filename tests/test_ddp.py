"""Two CPU processes (DDP, gloo) give the answers of one: `validate` calibrates the same thresholds,
`test` reports the same accuracy, GFLOPs, exit histogram, budget curve and robust accuracy, and
MIA-Former's stage pipeline fits with both ranks' weights identical at every epoch.

The evaluation set has 33 images in batches of 4: one process runs 9 batches (the last of one
image), two processes 5 (rank 0, last batch of one image) and 4 (rank 1). Lightning's default
DistributedSampler would pad rank 1 with a repeated image; ImageDataModule's unrepeated sampler and
the callbacks' de-duplication must count every image exactly once.

The 2-process runs are `python -m adaptive_vit ... --trainer.strategy ddp --trainer.devices 2`
subprocesses (Lightning starts rank 1 by re-running the command), as on a cluster.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, DistributedSampler

from adaptive_vit.callbacks import calibration
from adaptive_vit.callbacks.calibration import SampleCollector
from adaptive_vit.cli import AdaptiveViTCLI, main
from conftest import FAST_TRAINER, REPO, make_image_folder

pytestmark = pytest.mark.slow

NUM_IMAGES = 33  # per split: 3 classes x 11
SMALL = ["--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}"]
FRACTIONS = {"dvt": [0.25, 0.4, 0.6], "cfvit": [0.5, 0.75]}  # calibrated budgets, above the first exit's cost


class RanksAgree(Callback):
    """Stops the run with an error when the DDP ranks' weights or buffers differ at an epoch's end
    (e.g. a parameter DDP does not synchronise because it was frozen when DDP wrapped the model)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = torch.cat([t.detach().double().flatten() for t in pl_module.state_dict().values()])
        gathered = pl_module.all_gather(state)  # (world, numel)
        differ = [k for k in range(1, len(gathered)) if not torch.equal(gathered[k], gathered[0])]
        if differ:
            raise RuntimeError(f"epoch {trainer.current_epoch}: ranks {differ} hold other weights than rank 0")


# ---------------------------------------------------------------------- running and reading


def run_one(cwd: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Path, AdaptiveViTCLI]:
    """`adaptive-vit ARGS` in this process, inside `cwd`; returns the run's version folder and the CLI."""
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    cli = main(list(args))
    return _only_run(cwd), cli


def run_two(cwd: Path, *args: str, strategy: str = "ddp") -> Path:
    """`adaptive-vit ARGS` as 2 DDP processes on the CPU, inside `cwd`; returns the version folder."""
    cwd.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "adaptive_vit", *args,
               "--trainer.accelerator", "cpu", "--trainer.strategy", strategy, "--trainer.devices", "2"]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return _only_run(cwd)


def _only_run(cwd: Path) -> Path:
    (run,) = (cwd / "runs").glob("*/version_*")  # both ranks log into one folder
    return run


def logged(run: Path) -> dict[str, float]:
    """Each metric's last value in the run's metrics.csv."""
    values: dict[str, float] = {}
    with open(run / "metrics.csv") as file:
        for row in csv.DictReader(file):
            values.update({k: float(v) for k, v in row.items() if v and k not in ("epoch", "step")})
    return values


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as file:
        return list(csv.DictReader(file))


def assert_same_numbers(two: object, one: object, where: str = "") -> None:
    """Equal structure, equal strings, numbers equal up to float summation order."""
    if isinstance(one, dict):
        assert isinstance(two, dict) and set(two) == set(one), f"{where}: keys {sorted(set(two) ^ set(one))}"
        for key in one:
            assert_same_numbers(two[key], one[key], f"{where}/{key}")
    elif isinstance(one, list):
        assert isinstance(two, list) and len(two) == len(one), where
        for i, (a, b) in enumerate(zip(two, one)):
            assert_same_numbers(a, b, f"{where}[{i}]")
    else:
        a, b = _number(two), _number(one)
        if isinstance(b, float) and isinstance(a, float):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-12) or math.isnan(a) and math.isnan(b), (where, a, b)
        else:
            assert two == one, (where, two, one)


def _number(value: object) -> object:
    try:
        return float(value)  # CSV cells are strings
    except (TypeError, ValueError):
        return value


# ---------------------------------------------------------------------- evaluation


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", per_class=NUM_IMAGES // 3)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as each DDP process has: the tiny models' many small ops gain nothing from two
    threads, and lose much when the machine's cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eval_args(method: str, images: Path, tmp_path: Path) -> list[str]:
    """A tiny `method` demo model on `images` (test falls back to val: the same 33 images), every
    evaluation batch, and the three callbacks, robustness at validation too (on every batch: its
    `num_batches`, a total over the processes, exceeds the batches). PGD is left out: its random
    start is seeded per batch and rank, and batches hold other images with two processes."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "FlopsBudgetTracker"},
        {"class_path": "ThresholdCalibration", "init_args": {
            "budget_fractions": FRACTIONS[method], "match_accuracy": True, "stages": ["validate"],
            "curve_points": 6, "plot": False}},
        {"class_path": "RobustnessEvaluation", "init_args": {
            "attacks": [{"name": "FGSM", "eps": 0.03}], "every_n_val_epochs": 1, "num_batches": 100}},
    ]}}))
    extra = ["--model.init_args.cls_attn_start", "0"] if method == "cfvit" else []
    return [
        "--config", str(REPO / f"configs/demo/{method}.yaml"), *SMALL, *extra, *FAST_TRAINER,
        "--data.init_args.dataset", "folder", "--data.init_args.root", str(images),
        "--data.init_args.batch_size", "4",
        "--trainer.limit_val_batches", "1.0", "--trainer.limit_test_batches", "1.0",
        "--config", str(callbacks),
    ]


def random_weights(method: str, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A checkpoint of random weights (one step at lr 1e-9) and thresholds by hand halfway between
    the two middle confidences of each early exit on the evaluation images: about half of the
    images answer at each early exit they reach, and no image sits on a threshold."""
    run, cli = run_one(tmp_path / "fit", monkeypatch, "fit", *eval_args(method, images, tmp_path),
                       "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
                       "--model.init_args.lr", "1e-9")
    net = cli.model.net.eval()
    with torch.no_grad():
        confidences = torch.cat([
            torch.stack([e.softmax(-1).amax(-1) for e in net.forward_exits(x)], dim=1)  # (B, K)
            for x, _ in cli.datamodule.val_dataloader()
        ])
    middle = confidences[:, :-1].sort(dim=0).values[NUM_IMAGES // 2 - 1: NUM_IMAGES // 2 + 1]  # (2, K-1)
    return run / "checkpoints" / "last.ckpt", str(middle.double().mean(0).tolist())


def assert_same_evaluation(run1: Path, run2: Path, stage: str, exit_names: tuple[str, ...]) -> None:
    """The two runs logged the same metrics and FLOPs rows, over all the images, each once."""
    metrics1, metrics2 = logged(run1), logged(run2)
    fractions = [metrics1[f"{stage}/exit_{name}/fraction"] for name in exit_names]
    assert all(f > 0 for f in fractions), f"an exit takes no image, a weak comparison: {fractions}"
    for name in ("top1", "gflops", "robust/clean_top1", "robust/fgsm_eps0.03/top1", "flops/gflops",
                 *(f"exit_{n}/top1" for n in exit_names)):
        assert f"{stage}/{name}" in metrics1, name
    assert_same_numbers(metrics2, metrics1, f"{stage} metrics")
    counts = [f * NUM_IMAGES for f in fractions]
    assert counts == pytest.approx([round(c) for c in counts], abs=1e-4)  # whole images out of 33
    (flops1,), (flops2,) = rows(run1 / "flops_budget.csv"), rows(run2 / "flops_budget.csv")
    assert int(flops1["images"]) == int(flops2["images"]) == NUM_IMAGES  # none padded, none dropped
    assert_same_numbers(flops2, flops1, "flops_budget.csv")


def test_ddp_validate_calibrates_like_one_process(images, tmp_path, monkeypatch):
    """DVT, three exits of random weights that disagree image by image: `validate` calibrates
    every budget and the curve to the same thresholds, and reports the same accuracy, GFLOPs,
    exit histogram and robust accuracy (at the hand-set thresholds) with 2 processes as with 1."""
    weights, thresholds = random_weights("dvt", images, tmp_path, monkeypatch)
    args = ["validate", *eval_args("dvt", images, tmp_path), "--ckpt_path", str(weights),
            "--model.init_args.thresholds", thresholds]
    validate1, cli = run_one(tmp_path / "validate1", monkeypatch, *args)
    validate2 = run_two(tmp_path / "validate2", *args)
    one, two = (json.loads((run / "thresholds.json").read_text()) for run in (validate1, validate2))
    assert {c["num_images"] for c in one["budgets"].values()} == {NUM_IMAGES}
    assert len({tuple(c["thresholds"]) for c in one["curve"]}) > 2, "degenerate calibration: a weak comparison"
    assert_same_numbers(two, one, "thresholds.json")  # every budget, the curve, the thresholds in use
    assert (validate2 / "calibrated.ckpt").is_file()
    assert_same_evaluation(validate1, validate2, "val", cli.model.net.exit_names)


def test_ddp_test_reports_like_one_process(images, tmp_path, monkeypatch):
    """CF-ViT at hand-set thresholds, from a checkpoint with calibrated budgets: `test` reports
    the same accuracy, GFLOPs, exit histogram, robust accuracy and budget curve with 2 processes
    as with 1."""
    weights, thresholds = random_weights("cfvit", images, tmp_path, monkeypatch)
    args = eval_args("cfvit", images, tmp_path)
    validate, _ = run_one(tmp_path / "validate", monkeypatch, "validate", *args, "--ckpt_path", str(weights))
    args = ["test", *args, "--ckpt_path", str(validate / "calibrated.ckpt"), "--model.init_args.thresholds", thresholds]
    test1, cli = run_one(tmp_path / "test1", monkeypatch, *args)
    test2 = run_two(tmp_path / "test2", *args)
    assert_same_evaluation(test1, test2, "test", cli.model.net.exit_names)
    assert "test/budget/fraction_0.5/top1" in logged(test1)
    assert_same_numbers(rows(test2 / "test_budget_curve.csv"), rows(test1 / "test_budget_curve.csv"))


def test_calibration_counts_padded_images_once(monkeypatch):
    """A data module with Lightning's default DistributedSampler (not ImageDataModule) pads rank 1
    with image 0 again: the calibration samples keep one copy of each image, in index order."""
    dataset = torch.arange(5)
    samplers = [DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False) for rank in (0, 1)]
    loaders = [DataLoader(dataset, batch_size=2, sampler=sampler) for sampler in samplers]
    assert [list(sampler) for sampler in samplers] == [[0, 2, 4], [1, 3, 0]]
    collectors = []
    for loader in loaders:
        collector = SampleCollector(loader, keys=("value",))
        for batch in loader:
            collector.add({"value": 10.0 * batch})
        collectors.append(collector)

    def module(world_size: int) -> SimpleNamespace:
        return SimpleNamespace(device=torch.device("cpu"), trainer=SimpleNamespace(world_size=world_size))

    rank1 = collectors[1].gather(module(1))

    def exchange(_, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # rank 0's all_gather
        return {key: torch.cat([local[key], rank1[key]]) for key in local}

    monkeypatch.setattr(calibration, "_all_gather_ragged", exchange)
    samples = collectors[0].gather(module(2))
    assert samples["index"].tolist() == [0, 1, 2, 3, 4]
    assert samples["value"].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]


# ---------------------------------------------------------------------- training


def test_mia_pipeline_fits_under_ddp_across_stage_boundaries(tmp_path, images):
    """All four MIA-Former phases (2 batches each) under 2-process DDP, from random weights.
    The phases freeze and unfreeze blocks and critics, so parameters go unused: DDP needs
    `find_unused_parameters` (`--trainer.strategy ddp_find_unused_parameters_true`). The ranks'
    weights are compared after every epoch; the FLOPs tracker and validation-time robustness
    reduce over both ranks and rank 0 alone writes the run folder."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "FlopsBudgetTracker", "init_args": {"per_block": True}},
        {"class_path": "RobustnessEvaluation",
         "init_args": {"attacks": [{"name": "FGSM", "eps": 0.03}], "every_n_val_epochs": 1, "num_batches": 1}},
        {"class_path": "test_ddp.RanksAgree"},
    ]}}))
    run = run_two(
        tmp_path / "fit", "fit", "--config", str(REPO / "configs/demo/mia.yaml"), *SMALL, *FAST_TRAINER,
        "--data.init_args.dataset", "folder", "--data.init_args.root", str(images),
        "--data.init_args.batch_size", "4", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--model.init_args.stage_epochs", "[1, 1, 1, 1]", "--trainer.max_epochs", "4",
        "--config", str(callbacks), strategy="ddp_find_unused_parameters_true",
    )
    assert (run / "checkpoints" / "last.ckpt").is_file()
    with open(run / "metrics.csv") as file:
        phases = [float(r["train/phase"]) for r in csv.DictReader(file) if r.get("train/phase")]
    assert phases == [1.0, 2.0, 3.0, 4.0]
    metrics = logged(run)
    assert "val/robust/fgsm_eps0.03/top1" in metrics and "val/flops/skip_tokens" in metrics
    flops = rows(run / "flops_budget.csv")
    assert [(r["epoch"], r["stage"]) for r in flops] == [(str(e), s) for e in range(4) for s in ("val", "train")]
    assert {r["stage"]: int(r["images"]) for r in flops} == {"train": 2 * 2 * 4, "val": 2 * 4}  # ranks x batches x 4
