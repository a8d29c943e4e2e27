"""`VisualizeDecisions` and the decision maps it draws: CF-ViT's re-split regions agree with its
early-exit forward, and `predict` writes the PNGs of every method through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from adaptive_vit.callbacks.visualize import VisualizeDecisions, _to_pixels
from adaptive_vit.methods.cfvit.model import CFViT
from adaptive_vit.methods.static import StaticViTLitModule
from conftest import FAST_TRAINER, REPO

TINY_WIDTH = ["--model.init_args.vit_kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}"]
# method → (config, extra fit arguments, files written besides exits.png and decisions.json)
METHODS = {
    "static": ("static", [], set()),
    "cfvit": ("cfvit", ["--model.init_args.selection_epoch", "0"], {"regions.png"}),
    "dvt": ("dvt", [], set()),
    "mia": ("mia", ["--model.init_args.stage", "2", "--model.init_args.stage_epochs", "null"], {"tokens.png"}),
}


def tiny_cfvit() -> CFViT:
    torch.manual_seed(0)
    net = CFViT.from_name("vit_tiny_patch16_224", alpha=0.3, cls_attn_start=0, img_size=32, patch_size=4,
                          num_classes=10, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():  # spread the confidences of a random head
        net.vit.head.weight.mul_(40)
    return net.eval()


def test_cfvit_regions_are_what_the_early_exit_forward_re_splits() -> None:
    net = tiny_cfvit()
    x = torch.randn(8, 3, 32, 32)
    selected: list[torch.Tensor] = []  # the informative indices the fine stage really uses
    select = net.select

    def recording_select(coarse, split_all=False):  # noqa: ANN001, ANN202
        informative, rest = select(coarse, split_all)
        selected.append(informative)
        return informative, rest

    net.select = recording_select
    with torch.no_grad():
        coarse = net.coarse_stage(x)
        ordered = coarse.logits.softmax(-1).amax(-1).sort().values
        net.set_thresholds([float(ordered[3] + ordered[4]) / 2])  # 4 images stop, 4 go on
        out = net.forward_adaptive(x, net.exit_thresholds.tolist())
        regions = net.decision_maps(x)["regions"]
    k = net.num_informative  # ⌈0.3·16⌉ = 5
    assert k == 5 and regions.shape == (8, 4, 4) and regions.dtype == torch.bool
    fine = out.exit_index == 1
    assert int(fine.sum()) == 4
    assert regions.flatten(1).sum(1).tolist() == [k if f else 0 for f in fine.tolist()]
    top = coarse.attention.topk(k, dim=1).indices
    for b in fine.nonzero()[:, 0].tolist():
        assert set(regions[b].flatten().nonzero()[:, 0].tolist()) == set(top[b].tolist())
    # the fine stage of forward_adaptive re-split exactly these regions (row-major coarse index)
    used = selected[0]  # (4, k) for the images that went on, in batch order
    for row, b in enumerate(fine.nonzero()[:, 0].tolist()):
        assert {(i // 4, i % 4) for i in used[row].tolist()} == {tuple(rc) for rc in regions[b].nonzero().tolist()}


def test_images_are_de_normalised_with_the_data_statistics() -> None:
    pixels = torch.rand(2, 3, 8, 8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.from_numpy(_to_pixels(normalised, mean, std)), pixels.permute(0, 2, 3, 1))
    stretched = _to_pixels(normalised, None, None)  # unknown statistics: each image to [0, 1]
    assert stretched.shape == (2, 8, 8, 3) and stretched.min() == 0.0 and stretched.max() == 1.0


@pytest.mark.parametrize("method", list(METHODS))
def test_predict_writes_the_pngs_of_each_method(method: str, run_cli, tmp_path: Path) -> None:  # noqa: ANN001
    name, extra, files = METHODS[method]
    config = ["--config", str(REPO / f"configs/demo/{name}.yaml"), *TINY_WIDTH, *extra]
    short = [*FAST_TRAINER, "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
             "--checkpoint.monitor", "null"]  # no validation: keep the last weights
    run_cli("fit", *config, *short)
    ckpt = tmp_path / f"runs/demo_{name}/version_0/checkpoints/last.ckpt"
    thresholds = ["--model.init_args.thresholds", "[.inf]"] if method == "cfvit" else []  # all to the fine stage
    cli = run_cli("predict", *config, *FAST_TRAINER, *thresholds, "--ckpt_path", str(ckpt),
                  "--trainer.limit_predict_batches", "3",
                  "--trainer.callbacks+=VisualizeDecisions", "--trainer.callbacks.max_images", "5")
    folder = Path(cli.trainer.log_dir).resolve() / "decisions"  # in the predict run's folder
    assert folder.is_relative_to(tmp_path / f"runs/demo_{name}")
    assert {p.name for p in folder.iterdir()} == {"exits.png", "decisions.json", *files}
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            assert image.width >= 200 and image.height >= 150
    records = json.loads((folder / "decisions.json").read_text())
    net = cli.model.net
    assert len(records) == 5
    # 3 batches of 16 → 2 images from each batch, evenly spaced: rows 0 and 8 (the last batch 1)
    assert [(r["batch"], r["row"]) for r in records] == [(0, 0), (0, 8), (1, 0), (1, 8), (2, 0)]
    predictions = cli.trainer.predict_loop.predictions  # what predict_step answered for them
    assert [r["prediction"] for r in records] == [int(predictions[r["batch"]]["prediction"][r["row"]]) for r in records]
    assert [r["exit"] for r in records] == [int(predictions[r["batch"]]["exit"][r["row"]]) for r in records]
    assert all(r["exit_name"] == net.exit_names[r["exit"]] and 0 < r["confidence"] <= 1 for r in records)
    if method == "cfvit":
        assert all(r["exit_name"] == "fine" and sum(map(sum, r["regions"])) == net.num_informative for r in records)
    if method == "mia":
        assert all(torch.tensor(r["tokens"]).shape == (2, 8, 8) and len(r["heads"][0]) == 2 for r in records)


def test_output_dir_that_is_a_file_is_a_clear_error(run_cli, tmp_path: Path) -> None:  # noqa: ANN001
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    weights = tmp_path / "weights.pt"  # predict refuses random weights: any state_dict of the network
    torch.save(StaticViTLitModule(backbone="vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10,
                                  vit_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}).net.state_dict(), weights)
    with pytest.raises(ValueError, match=r"cannot write to output_dir .*taken.*Give a writable folder"):
        run_cli("predict", "--config", str(REPO / "configs/demo/static.yaml"), *TINY_WIDTH, *FAST_TRAINER,
                "--model.init_args.init_from", str(weights),
                "--trainer.limit_predict_batches", "1", "--trainer.callbacks+=VisualizeDecisions",
                "--trainer.callbacks.output_dir", str(blocker / "decisions"))
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("arguments", [{"max_images": 0}, {"columns": 0}])
def test_bad_arguments_name_the_problem(arguments: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=f"{next(iter(arguments))} must be at least 1"):
        VisualizeDecisions(**arguments)
