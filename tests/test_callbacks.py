"""Calibration, FLOPs-budget and robustness callbacks on tiny models and generated image folders."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from adaptive_vit.backbones import BackboneSpec
from adaptive_vit.budget import budget_curve, evaluate_thresholds, solve_accuracy
from adaptive_vit.callbacks import FlopsBudgetTracker, RobustnessEvaluation, ThresholdCalibration
from adaptive_vit.data import ImageDataModule
from adaptive_vit.methods.base import AdaptiveLitModule
from adaptive_vit.methods.network import AdaptiveNetwork, AdaptiveOutput
from conftest import FAST_TRAINER, REPO, TINY_VIT, make_image_folder

# ---------------------------------------------------------------------- a tiny two-exit model


class TinyExits(AdaptiveNetwork):
    """Two exits on 32x32 images: a linear classifier of 4x4-pooled pixels, then an MLP on 8x8-pooled
    pixels for the images that go on. Its costs are declared units (exit 1: 1, exit 2: 3, backbone 2.5).
    Images answering early do not run the second stage, and report decisions {"blocks": (B, 2)}."""

    exit_names = ("early", "late")
    costs = (1.0, 3.0)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.early = nn.Linear(3 * 4 * 4, num_classes)
        self.late = nn.Sequential(nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def _early(self, x: Tensor) -> Tensor:
        return self.early(F.adaptive_avg_pool2d(x, 4).flatten(1))

    def _late(self, x: Tensor) -> Tensor:
        return self.late(F.adaptive_avg_pool2d(x, 8).flatten(1))

    def forward_train(self, x: Tensor) -> list[Tensor]:
        return self.forward_exits(x)

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        return [self._early(x), self._late(x)]

    def forward_adaptive(self, x: Tensor, thresholds: Sequence[float]) -> AdaptiveOutput:
        logits = self._early(x)
        going_on = logits.softmax(-1).amax(-1) < thresholds[0]  # (B,)
        logits = logits.clone()
        logits[going_on] = self._late(x[going_on]).to(logits.dtype)  # only those images run stage 2
        exit_index = going_on.long()
        gflops = torch.tensor(self.costs, device=x.device)[exit_index]
        blocks = torch.stack([torch.ones_like(gflops), going_on.float()], dim=1)  # (B, 2) kept
        return AdaptiveOutput(logits, exit_index, gflops, {"blocks": blocks})

    def exit_gflops(self) -> list[float]:
        return list(self.costs)

    def static_gflops(self) -> float:
        return 2.5

    def input_size(self) -> tuple[int, int, int]:
        return (3, 32, 32)


class TinyExitsLitModule(AdaptiveLitModule):
    def configure_network(self) -> TinyExits:
        return TinyExits(self.hparams.num_classes)

    def compute_loss(self, output: list[Tensor], target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        gflops = torch.full((len(target),), TinyExits.costs[-1], device=target.device)
        return sum(self.criterion(o, target) for o in output), {"gflops": gflops}

    def has_trained_weights(self) -> bool:
        return True


def tiny_model(**kwargs) -> TinyExitsLitModule:
    torch.manual_seed(0)
    return TinyExitsLitModule(num_classes=3, lr=2e-2, warmup_epochs=0, weight_decay=0.0, **kwargs)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    # 21 images per split: batches of 8 leave a ragged last batch, and 2 ranks a padded sample.
    return make_image_folder(tmp_path / "images", per_class=7)


def datamodule(root: Path, batch_size: int = 8) -> ImageDataModule:
    return ImageDataModule("folder", root=str(root), img_size=32, batch_size=batch_size, num_workers=0,
                           auto_augment=None, reprob=0.0)


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
                   enable_model_summary=False, inference_mode=False, num_sanity_val_steps=0,
                   logger=CSVLogger(tmp_path, name="run", version=0), default_root_dir=tmp_path)
    return Trainer(callbacks=callbacks, **{**options, **kwargs})


def eval_samples(model: AdaptiveLitModule, root: Path) -> tuple[Tensor, Tensor]:
    """(N, K) confidences and correctness of every validation image, computed directly."""
    dm = datamodule(root)
    dm.setup("validate")
    model.eval()
    confidences, correct = [], []
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            probs = torch.stack([e.softmax(-1) for e in model.net.forward_exits(x)], 1)
            conf, pred = probs.max(-1)
            confidences.append(conf)
            correct.append(pred == y[:, None])
    return torch.cat(confidences), torch.cat(correct)


# ---------------------------------------------------------------------- calibration


@pytest.fixture
def trained(tmp_path, data_root) -> TinyExitsLitModule:
    seed_everything(0)
    model = tiny_model()
    trainer(tmp_path / "train", [], max_epochs=8, limit_val_batches=0).fit(model, datamodule(data_root))
    return model


def test_calibration_solves_stores_selects_and_writes(tmp_path, data_root, trained):
    model = trained
    calibration = ThresholdCalibration(budgets_gflops=[1.8], budget_fractions=[0.5], match_accuracy=True,
                                       select="fraction_0.5", curve_points=5)
    trainer(tmp_path, [calibration]).validate(model, datamodule(data_root))

    confidences, correct = eval_samples(model, data_root)
    assert len(confidences) == 21
    expected = budget_curve(confidences, correct, [1.0, 3.0], budgets=[1.8, 1.5])
    match = solve_accuracy(confidences, correct, [1.0, 3.0], correct[:, 1].sum().item() / 21)
    cal = model.exit_policy.calibrations
    assert set(cal) == {"gflops_1.8", "fraction_0.5", "match_accuracy", *(f"curve_{i:02d}" for i in range(5))}
    for name, result in [("gflops_1.8", expected[0]), ("fraction_0.5", expected[1]), ("match_accuracy", match)]:
        assert cal[name]["thresholds"] == pytest.approx(result.thresholds)
        assert cal[name]["accuracy"] == pytest.approx(result.accuracy)
        assert cal[name]["gflops"] == pytest.approx(result.gflops)
    assert cal["fraction_0.5"]["gflops"] <= 1.5 + 1e-9
    assert cal["match_accuracy"]["accuracy"] >= correct[:, 1].sum().item() / 21
    assert cal["match_accuracy"]["gflops"] < 3.0  # some images exit early at no loss
    # the selected budget's thresholds are the network's
    assert model.net.exit_thresholds.tolist() == pytest.approx(cal["fraction_0.5"]["thresholds"])

    log_dir = tmp_path / "run" / "version_0"
    report = json.loads((log_dir / "thresholds.json").read_text())
    assert report["selected"] == "fraction_0.5"
    assert set(report["budgets"]) == {"gflops_1.8", "fraction_0.5", "match_accuracy"}
    assert len(report["curve"]) == 5 and report["exit_gflops"] == [1.0, 3.0]
    rows = list(csv.DictReader((log_dir / "budget_curve.csv").open()))
    assert [r["name"] for r in rows][:3] == ["gflops_1.8", "fraction_0.5", "match_accuracy"]
    assert float(rows[0]["accuracy"]) == pytest.approx(expected[0].accuracy)
    assert (log_dir / "budget_curve.png").stat().st_size > 1000
    # `validate` saved the calibrated model: `test` on it uses a calibrated budget by name
    fresh = tiny_model(budget="gflops_1.8")
    trainer(tmp_path / "test", []).test(fresh, datamodule(data_root), ckpt_path=str(log_dir / "calibrated.ckpt"))
    assert fresh.net.exit_thresholds.tolist() == pytest.approx(cal["gflops_1.8"]["thresholds"])


def test_calibration_curve_starts_exactly_at_the_first_exit_cost(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr(TinyExits, "costs", (0.7, 2.1))  # 0.7 rounds down in float32
    model = tiny_model()
    trainer(tmp_path, [ThresholdCalibration(curve_points=3, plot=False)]).validate(model, datamodule(data_root))
    assert model.exit_policy.calibrations["curve_00"]["target"] == 0.7
    assert model.exit_policy.calibrations["curve_00"]["gflops"] == pytest.approx(0.7)


def test_calibration_rejects_a_budget_it_does_not_calibrate(tmp_path, data_root):
    with pytest.raises(ValueError, match=r"the model's budget 'fraction_0.9' is not one ThresholdCalibration"):
        trainer(tmp_path, [ThresholdCalibration(budget_fractions=[0.5])]).validate(
            tiny_model(budget="fraction_0.9"), datamodule(data_root))


def test_calibration_rejects_impossible_budget(tmp_path, data_root):
    calibration = ThresholdCalibration(budget_fractions=[0.2], match_accuracy=False)
    with pytest.raises(ValueError, match=r"below the cheapest possible cost.*1 GFLOPs.*fraction 0.333"):
        trainer(tmp_path, [calibration]).validate(tiny_model(), datamodule(data_root))
    with pytest.raises(ValueError, match="select='nope' is not a configured budget"):
        ThresholdCalibration(budget_fractions=[0.5], select="nope")


def test_checkpoint_round_trip_and_test_uses_the_chosen_budget(tmp_path, data_root):
    seed_everything(0)
    model = tiny_model()
    calibration = ThresholdCalibration(budget_fractions=[0.6], match_accuracy=True, curve_points=4)
    fit = trainer(tmp_path, [calibration], max_epochs=3)
    fit.fit(model, datamodule(data_root))
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "epoch=2-step=9.ckpt"
    assert ckpt.is_file()
    saved = torch.load(ckpt, weights_only=True)["adaptive_vit"]["calibrations"]
    assert saved == model.exit_policy.calibrations
    # default selection (the first budget) is in the checkpoint's thresholds buffer
    assert torch.load(ckpt, weights_only=True)["state_dict"]["net.exit_thresholds"].tolist() == pytest.approx(
        saved["fraction_0.6"]["thresholds"])

    confidences, correct = eval_samples(model, data_root)  # test split == val split here
    for budget in ("match_accuracy", "curve_00"):
        fresh = tiny_model(budget=budget)
        test = trainer(tmp_path / budget, [calibration, FlopsBudgetTracker()])
        metrics = test.test(fresh, datamodule(data_root), ckpt_path=str(ckpt))[0]
        thresholds = saved[budget]["thresholds"]
        assert fresh.exit_policy.calibrations == saved
        assert fresh.net.exit_thresholds.tolist() == pytest.approx(thresholds)
        expected = evaluate_thresholds(confidences, correct, [1.0, 3.0], thresholds)
        assert metrics["test/gflops"] == pytest.approx(expected.gflops, rel=1e-5)
        assert metrics["test/top1"] == pytest.approx(expected.accuracy, rel=1e-5)
        assert {"test/budget/fraction_0.6/top1", "test/budget/match_accuracy/gflops"} <= set(metrics)
        assert not any("curve" in key for key in metrics)  # curve points go to the CSV only
        rows = {r["name"]: r for r in csv.DictReader((tmp_path / budget / "run" / "version_0" / "test_budget_curve.csv").open())}
        assert set(rows) == set(saved)
        assert float(rows[budget]["gflops"]) == pytest.approx(expected.gflops)
        assert float(rows[budget]["val_gflops"]) == pytest.approx(saved[budget]["gflops"])
    assert saved["curve_00"]["gflops"] == pytest.approx(1.0)  # the cheapest curve point: all exit early

    # thresholds by hand beat the checkpoint's (which are loaded after the model is built)
    fresh = tiny_model(thresholds=[0.0])
    metrics = trainer(tmp_path / "manual", []).test(fresh, datamodule(data_root), ckpt_path=str(ckpt))[0]
    assert metrics["test/gflops"] == pytest.approx(1.0)
    assert metrics["test/exit_early/fraction"] == 1.0

    fresh = tiny_model(budget="fraction_0.9")
    with pytest.raises(ValueError, match=r"budget 'fraction_0.9' is not calibrated.*'fraction_0.6'"):
        trainer(tmp_path / "missing", []).test(fresh, datamodule(data_root), ckpt_path=str(ckpt))


def test_calibration_skips_single_exit_models(tmp_path, data_root):
    from adaptive_vit.methods.static import StaticViTLitModule

    model = StaticViTLitModule(backbone=BackboneSpec("vit_tiny_patch16_224", img_size=32, patch_size=4, kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}), num_classes=3)
    trainer(tmp_path, [ThresholdCalibration(budget_fractions=[0.5])]).validate(model, datamodule(data_root))
    assert model.exit_policy.calibrations == {}
    assert not (tmp_path / "run" / "version_0" / "thresholds.json").exists()


# ---------------------------------------------------------------------- FLOPs budget


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_flops_budget_csv_logs_and_warning(tmp_path, data_root):
    model = tiny_model(thresholds=[0.5])
    tracker = FlopsBudgetTracker(target_gflops=1.2, tolerance=0.1, per_block=True)
    fit = trainer(tmp_path, [tracker], max_epochs=2, limit_train_batches=2)
    with pytest.warns(UserWarning, match=r"val mean .* GFLOPs per image exceeds the target 1.2 by"):
        fit.fit(model, datamodule(data_root))
    assert fit.current_epoch == 2  # warned, not stopped

    rows = read_rows(tmp_path / "run" / "version_0" / "flops_budget.csv")
    assert [(r["epoch"], r["stage"]) for r in rows] == [("0", "val"), ("0", "train"), ("1", "val"), ("1", "train")]
    train, val = rows[-1], rows[-2]
    assert float(train["gflops"]) == 3.0 and float(train["ratio"]) == pytest.approx(3.0 / 2.5)
    confidences, correct = eval_samples(model, data_root)
    expected = evaluate_thresholds(confidences, correct, [1.0, 3.0], [0.5])
    assert float(val["gflops"]) == pytest.approx(expected.gflops)
    assert float(val["ratio"]) == pytest.approx(expected.gflops / 2.5)
    assert float(val["exit_early"]) == pytest.approx(expected.exit_fractions[0])
    assert float(val["skip_blocks_0"]) == 0.0
    assert float(val["skip_blocks_1"]) == pytest.approx(expected.exit_fractions[0])
    assert float(val["skip_blocks"]) == pytest.approx(expected.exit_fractions[0] / 2)
    logged = fit.callback_metrics
    assert logged["val/flops/gflops"].item() == pytest.approx(expected.gflops)
    assert logged["val/flops/skip_blocks_1"].item() == pytest.approx(expected.exit_fractions[0])
    assert logged["train/flops/ratio"].item() == pytest.approx(1.2)


def test_flops_budget_takes_the_models_target_unless_given(tmp_path, data_root):
    model = tiny_model(thresholds=[0.5])
    model.hparams.target_gflops = 1.2  # as MIALitModule's `target_gflops`
    fit = trainer(tmp_path, [FlopsBudgetTracker(tolerance=0.1)], max_epochs=1, limit_train_batches=1)
    with pytest.warns(UserWarning, match=r"exceeds the target 1.2 by"):
        fit.fit(model, datamodule(data_root))
    assert float(read_rows(tmp_path / "run" / "version_0" / "flops_budget.csv")[0]["target_gflops"]) == 1.2
    given = FlopsBudgetTracker(target_gflops=100.0)
    trainer(tmp_path / "given", [given], max_epochs=1, limit_train_batches=1).fit(model, datamodule(data_root))
    assert given.target_gflops == 100.0


def test_flops_budget_stops_when_asked(tmp_path, data_root):
    tracker = FlopsBudgetTracker(target_gflops=1.0, tolerance=0.0, stop_on_exceed=True)
    fit = trainer(tmp_path, [tracker], max_epochs=5, limit_train_batches=1)
    with pytest.warns(UserWarning, match="stopping training"):
        fit.fit(tiny_model(), datamodule(data_root))  # thresholds +inf: everything costs 3.0
    assert fit.current_epoch == 1


def test_flops_budget_resumed_mid_epoch_counts_the_whole_epoch(tmp_path, data_root, monkeypatch):
    whole = FlopsBudgetTracker()  # 2 epochs of 3 batches
    trainer(tmp_path / "whole", [whole], limit_val_batches=0, max_epochs=2).fit(tiny_model(), datamodule(data_root))
    every_step = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    stopped = trainer(tmp_path / "stopped", [FlopsBudgetTracker(), every_step], limit_val_batches=0,
                      max_epochs=2, max_steps=4)
    stopped.fit(tiny_model(), datamodule(data_root))  # stopped after the 1st batch of the 2nd epoch
    resumed = FlopsBudgetTracker()
    trainer(tmp_path / "resumed", [resumed], limit_val_batches=0, max_epochs=2).fit(
        tiny_model(), datamodule(data_root), ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert [(r["epoch"], r["stage"], r["images"]) for r in whole.rows] == [(0, "train", 21), (1, "train", 21)]
    assert resumed.rows == whole.rows  # the 1st epoch's row and the batch before the checkpoint are kept

    state = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=True)["callbacks"]["FlopsBudgetTracker"]
    assert state["sums"]["train"]["count"].item() == 8
    # Other DDP ranks start from zero (the saved sums are all ranks'); evaluating starts afresh.
    for stage, rank, sums, rows in (("fit", 0, True, 1), ("fit", 1, False, 1), ("validate", 0, False, 0)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        tracker = FlopsBudgetTracker()
        tracker.setup(stopped, stopped.lightning_module, stage)
        tracker.load_state_dict(state)
        assert ("count" in tracker._sums["train"], len(tracker.rows)) == (sums, rows), (stage, rank)


def test_flops_budget_checkpoint_leaves_the_running_sums_alone():
    tracker = FlopsBudgetTracker()
    tracker._sums["train"] = {"count": torch.tensor(8.0)}
    tracker._strategy = SimpleNamespace(reduce=lambda value, reduce_op: value.mul_(2))  # DDP: in place, 2 ranks
    assert tracker.state_dict()["sums"] == {"train": {"count": torch.tensor(16.0)}}
    assert tracker._sums["train"]["count"].item() == 8  # this rank goes on from its own sums


# ---------------------------------------------------------------------- robustness


def test_robustness_lowers_accuracy_and_eps_zero_is_clean(tmp_path, data_root, trained):
    trained.net.set_thresholds([0.9])  # adaptive: gradients go through the exit each image takes
    attacks = [{"name": "PGD", "eps": 0.0, "steps": 3}, {"name": "PGD", "eps": 0.1, "steps": 5},
               {"name": "FGSM", "eps": 0.1}]
    test = trainer(tmp_path, [RobustnessEvaluation(attacks=attacks)])
    metrics = test.test(trained, datamodule(data_root))[0]
    assert metrics["test/robust/clean_top1"] >= 0.8
    assert metrics["test/robust/clean_top1"] == pytest.approx(metrics["test/top1"])
    assert metrics["test/robust/pgd_eps0/top1"] == metrics["test/robust/clean_top1"]
    assert metrics["test/robust/pgd_eps0.1/top1"] < metrics["test/robust/clean_top1"] - 0.3
    assert metrics["test/robust/fgsm_eps0.1/top1"] < metrics["test/robust/clean_top1"]
    assert metrics["test/robust/pgd_eps0.1/top1"] <= metrics["test/robust/fgsm_eps0.1/top1"]


def test_robustness_during_validation_on_fixed_batches(tmp_path, data_root):
    callback = RobustnessEvaluation(attacks=[{"name": "FGSM", "eps": 0.05}], on_test=False,
                                    every_n_val_epochs=2, num_batches=1)
    fit = trainer(tmp_path, [callback], max_epochs=3, limit_train_batches=1)
    fit.fit(tiny_model(), datamodule(data_root))
    rows = read_rows(tmp_path / "run" / "version_0" / "metrics.csv")
    attacked = [r["epoch"] for r in rows if r.get("val/robust/fgsm_eps0.05/top1")]
    assert attacked == ["1"]  # the 2nd validation epoch only


def test_robustness_batch_limit_and_seeds_are_global():
    callback = RobustnessEvaluation(num_batches=5, seed=10)
    assert [callback.batches_per_rank(world_size) for world_size in (1, 2, 4, 5, 8)] == [5, 3, 2, 1, 1]
    ranks = [SimpleNamespace(world_size=2, global_rank=rank) for rank in (0, 1)]
    seeds = [callback.batch_seed(batch_idx, rank) for batch_idx in range(3) for rank in ranks]
    assert sorted(seeds) == list(range(10, 16))  # one seed per batch of any rank
    one = SimpleNamespace(world_size=1, global_rank=0)
    assert [callback.batch_seed(batch_idx, one) for batch_idx in range(3)] == [10, 11, 12]


def test_robustness_random_start_is_reproducible(tmp_path, data_root, monkeypatch):
    import torchattacks

    attacked: list[Tensor] = []  # the adversarial images of every batch
    pgd = torchattacks.PGD.forward

    def recorded(attack, *args):
        attacked.append(pgd(attack, *args))
        return attacked[-1]

    monkeypatch.setattr(torchattacks.PGD, "forward", recorded)
    attacks = [{"name": "PGD", "eps": 0.1, "steps": 1, "random_start": True}]
    runs = []
    for global_seed in (1, 2):  # the callback's seed, not the global RNG, decides the random starts
        model = tiny_model()
        torch.manual_seed(global_seed)
        trainer(tmp_path / str(global_seed), [RobustnessEvaluation(attacks=attacks, seed=3)]).test(
            model, datamodule(data_root))
        runs.append(torch.cat(attacked))
        attacked.clear()
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_robustness_needs_gradients(tmp_path, data_root):
    test = trainer(tmp_path, [RobustnessEvaluation()], inference_mode=True)
    with pytest.raises(RuntimeError, match=r"Set `trainer.inference_mode: false`"):
        test.test(tiny_model(), datamodule(data_root))


def test_robustness_rejects_unknown_attack():
    with pytest.raises(ValueError, match="unknown attack 'PDG'"):
        RobustnessEvaluation(attacks=[{"name": "PDG", "eps": 0.1}])


def test_robustness_default_is_mia_former_setting():
    callback = RobustnessEvaluation()
    assert [RobustnessEvaluation.label(s) for s in callback.specs] == ["pgd_eps0.002", "fgsm_eps0.03"]
    assert RobustnessEvaluation.label({"name": "PGD", "eps": 8 / 255}) == "pgd_eps0.0313725"
    assert callback.specs[0]["alpha"] == pytest.approx(0.0005) and callback.specs[0]["steps"] == 10
    assert math.isclose(RobustnessEvaluation(attacks=[{"name": "PGD", "eps": 0.01}]).specs[0]["alpha"], 0.0025)


# ---------------------------------------------------------------------- all three from YAML


def test_static_demo_config_runs_all_callbacks_from_yaml(tmp_path, run_cli, image_folder):
    keep_callbacks = [a for i, a in enumerate(FAST_TRAINER)
                      if not {a, FAST_TRAINER[i - 1]} & {"--trainer.callbacks", "--trainer.enable_progress_bar"}]
    common = ["--config", str(REPO / "configs/demo/static.yaml"), *TINY_VIT, *keep_callbacks,
              "--data.init_args.dataset", "folder", "--data.init_args.root", str(image_folder)]
    fit = run_cli("fit", *common)
    names = [type(c).__name__ for c in fit.trainer.callbacks]
    assert {"FlopsBudgetTracker", "ThresholdCalibration", "RobustnessEvaluation", "RichProgressBar"} <= set(names)
    (run,) = (tmp_path / "runs").glob("*/version_0")
    test = run_cli("test", *common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    metrics = test.trainer.callback_metrics
    assert {"test/robust/clean_top1", "test/robust/pgd_eps0.002/top1", "test/robust/fgsm_eps0.03/top1"} <= set(metrics)
    assert metrics["test/robust/clean_top1"].item() == pytest.approx(metrics["test/top1"].item())
    assert metrics["test/flops/ratio"].item() == pytest.approx(1.0)
    rows = read_rows(run / "flops_budget.csv")  # the static model: ratio 1.0, train and eval
    assert {r["stage"] for r in rows} == {"train", "val"}
    assert all(float(r["ratio"]) == pytest.approx(1.0) for r in rows)
