"""T2T-ViT: the backbone family (grids, costs, the authors' function) and DVT over it (costs per
exit, the authors' checkpoints, the demo pipeline)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptive_vit.backbones import BackboneSpec, build_backbone, family_of
from adaptive_vit.backbones.t2t_vit import T2TViT, sinusoid_table
from adaptive_vit.flops import fvcore_gflops
from adaptive_vit.methods.dvt.convert import convert_authors_checkpoint
from adaptive_vit.methods.dvt.lit import DVTLitModule
from adaptive_vit.methods.dvt.model import DVT
from conftest import FAST_TRAINER, REPO
from test_dvt import ExitWithHandoff, authors_exit_names, authors_forward, in_authors_layout

# A T2T-ViT small enough to run: 32x32 images, performers of width 8, width 32, 2 blocks, 2 heads.
TINY_T2T = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, token_width=8)


def tiny_t2t(soft_split: list[int], seed: int = 0) -> T2TViT:
    torch.manual_seed(seed)
    spec = BackboneSpec(name="t2t_vit_12", img_size=32, drop_path_rate=0.0,
                        kwargs={**TINY_T2T, "soft_split": soft_split})
    return build_backbone(spec, 10)[0].eval()


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Random values in every tensor of the state (zero biases and unit norms hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)


# ----------------------------------------------------------------------------- the authors' function
# Their T2T-ViT forward, written from their code's facts alone (functional, no module of ours):
# unfold, performer (k, q, v split of `kqv` in that order, positive random features, v as skip),
# unfold 3/2/1, performer, unfold 3/2/1, project; cls token, sinusoidal positions, blocks with no
# qkv bias, LayerNorm eps 1e-5.


def _ln(state: dict, t: torch.Tensor, p: str) -> torch.Tensor:
    return F.layer_norm(t, t.shape[-1:], state[p + ".weight"], state[p + ".bias"], 1e-5)


def _lin(state: dict, t: torch.Tensor, p: str) -> torch.Tensor:
    return F.linear(t, state[p + ".weight"], state.get(p + ".bias"))


def _performer(state: dict, x: torch.Tensor, p: str) -> torch.Tensor:
    x = _ln(state, x, p + ".norm1")
    emb = state[p + ".proj.weight"].shape[0]
    w = state[p + ".w"]
    k, q, v = torch.split(_lin(state, x, p + ".kqv"), emb, dim=-1)

    def prm(t):
        return torch.exp(torch.einsum("bti,mi->btm", t, w) - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    kp, qp = prm(k), prm(q)
    d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1))[..., None]
    kptv = torch.einsum("bin,bim->bnm", v, kp)
    y = v + _lin(state, torch.einsum("bti,bni->btn", qp, kptv) / (d + 1e-8), p + ".proj")
    return y + _lin(state, F.gelu(_lin(state, _ln(state, y, p + ".norm2"), p + ".mlp.0")), p + ".mlp.2")


def authors_t2t_tokens(state: dict, x: torch.Tensor, p: str, soft_split: list[int]) -> torch.Tensor:
    """(B, C, H, W) → (B, 1 + N, D): tokens-to-token, cls token, positions."""
    kernel, stride, padding = soft_split
    t = F.unfold(x, kernel, stride=stride, padding=padding).transpose(1, 2)
    for i in (1, 2):
        t = _performer(state, t, f"{p}tokens_to_token.attention{i}")
        side = int(math.sqrt(t.shape[1]))
        t = F.unfold(t.transpose(1, 2).reshape(t.shape[0], -1, side, side), 3, stride=2, padding=1).transpose(1, 2)
    t = _lin(state, t, p + "tokens_to_token.project")
    t = torch.cat([state[p + "cls_token"].expand(len(x), -1, -1), t], 1)
    return t + state[p + "pos_embed"]


def t2t_tokens(soft_split: list[int]):  # noqa: ANN201
    """The authors' T2T tokenizer of one exit, for `test_dvt.authors_forward`."""
    return lambda state, name, x: authors_t2t_tokens(state, x, name + ".", soft_split)


def authors_t2t_vit(state: dict, x: torch.Tensor, soft_split: list[int], heads: int) -> torch.Tensor:
    """Their static T2T-ViT: a one-exit cascade (LayerNorm eps 1e-5, T2T-ViT's)."""
    named = {f"model.{k}": v for k, v in state.items()}
    return authors_forward(named, x, [("model", t2t_tokens(soft_split))], heads, eps=1e-5)[0]


# ----------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("soft_split, grid", [([7, 4, 2], 14), ([11, 6, 5], 10), ([14, 8, 3], 7)])
def test_first_soft_split_sets_the_authors_grids(soft_split: list[int], grid: int) -> None:
    with torch.device("meta"):
        model, family = build_backbone(BackboneSpec(name="t2t_vit_12", kwargs={"soft_split": soft_split}), 1000)
    assert family.dims(model).grid == (grid, grid) and model.pos_embed.shape == (1, 1 + grid * grid, 256)


def test_same_function_as_the_authors_t2t_vit_on_random_weights() -> None:
    model = tiny_t2t([3, 2, 1])
    randomize(model)
    state = model.state_dict()
    assert {"tokens_to_token.attention1.w", "pos_embed"} <= set(state)  # the fixed tensors are saved
    assert not any(k.endswith("attn.qkv.bias") for k in state)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), authors_t2t_vit(state, x, [3, 2, 1], heads=2), rtol=1e-4, atol=1e-5)


def test_fixed_tensors_are_buffers_not_trained() -> None:
    model = tiny_t2t([3, 2, 1])
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith(".w") or n == "pos_embed" for n in names)
    w = model.tokens_to_token.attention1.w  # (m, width): orthogonal rows of norm sqrt(m)
    torch.testing.assert_close(w @ w.T, torch.eye(4) * 4, atol=1e-5, rtol=0)


def test_sinusoid_positions() -> None:
    table = sinusoid_table(5, 6)[0]
    pos, j = 3, 4  # even channel: sin(pos / 10000^(4/6)); odd channel 5: cos of the same angle
    assert table[pos, j].item() == pytest.approx(math.sin(pos / 10000 ** (4 / 6)), abs=1e-6)
    assert table[pos, j + 1].item() == pytest.approx(math.cos(pos / 10000 ** (4 / 6)), abs=1e-6)


@pytest.mark.parametrize("soft_split", [[3, 2, 1], [4, 4, 0]])
def test_analytic_gflops_equal_fvcore(soft_split: list[int]) -> None:
    model = tiny_t2t(soft_split)
    family = family_of(model)
    assert family.gflops(model) == pytest.approx(fvcore_gflops(model, torch.randn(1, 3, 32, 32)), rel=1e-9)


def test_t2t_vit_12_reference_gflops_equal_fvcore() -> None:
    model, family = build_backbone(BackboneSpec(name="t2t_vit_12"), 1000)
    assert family.gflops(model) == pytest.approx(fvcore_gflops(model, torch.randn(1, 3, 224, 224)), rel=1e-9)
    assert family.gflops(model) == pytest.approx(1.78, rel=0.02)  # DVT Table 1; T2T-ViT: 1.8 G


@pytest.mark.parametrize("config, gflops, params", [("static_t2t_vit_12", 1.78, 6.9), ("static_t2t_vit_14", 4.80, 21.5)])
def test_static_configs_report_the_papers_gflops(config: str, gflops: float, params: float, tmp_path: Path) -> None:
    report = flops_report(config, tmp_path)
    assert report["static_gflops"] == pytest.approx(gflops, rel=0.02)
    assert report["params_m"] == pytest.approx(params, rel=0.02)  # T2T-ViT paper, Table 1


def flops_report(config: str, cwd: Path) -> dict:
    """`adaptive-vit flops --config configs/<config>.yaml --format json`."""
    out = subprocess.run(
        [sys.executable, "-m", "adaptive_vit", "flops", "--config", str(REPO / f"configs/{config}.yaml"),
         "--format", "json"], capture_output=True, text=True, cwd=cwd, check=True).stdout
    return json.loads(out[out.index("{"):])


def test_a_patch_size_gets_the_soft_split_spelling() -> None:
    with pytest.raises(ValueError, match=r"soft_split: \[kernel, stride, padding\]"):
        build_backbone(BackboneSpec(name="t2t_vit_12", patch_size=16), 10)
    with pytest.raises(ValueError, match="t2t_vit_12, t2t_vit_14|builds"):
        build_backbone(BackboneSpec(name="t2t_vit_13"), 10)


# ----------------------------------------------------------------------------- DVT over T2T-ViT

# The authors' first soft splits on 224: 7x7, 10x10, 14x14 tokens.
SPLITS_224 = [{"soft_split": [14, 8, 3]}, {"soft_split": [11, 6, 5]}, {"soft_split": [7, 4, 2]}]
# 32x32 images: 4x4, 6x6 and 8x8 tokens (configs/demo/dvt_t2t.yaml's splits).
SPLITS_32 = [{"soft_split": [4, 2, 1]}, {"soft_split": [9, 1, 0]}, {"soft_split": [3, 1, 1]}]
TINY_DVT = dict(img_size=32, num_classes=10, patch_sizes=None, paddings=None, reuse_hidden=16, reuse_dim=8, **TINY_T2T)
AUTHORS_LAYOUT = Path(__file__).parent / "reference"


def t2t_dvt(name: str, **options) -> DVT:
    return DVT.from_name(name, patch_sizes=None, paddings=None, **{"exit_kwargs": SPLITS_224, **options}).eval()


@pytest.fixture(scope="module")
def dvt_12() -> DVT:
    return t2t_dvt("t2t_vit_12")


@pytest.fixture(scope="module")
def dvt_14() -> DVT:
    return t2t_dvt("t2t_vit_14")


def exit_costs_measured(model: DVT, x: torch.Tensor) -> list[float]:
    """fvcore's GFLOPs of each exit as it runs in the cascade (its upstream's handoff as input)."""
    costs, handoff = [], None
    for k, exit_ in enumerate(model.exits):
        hands = model._hands_logits(k)
        upstream = () if handoff is None else tuple(handoff)  # (tokens, logits): both reuses on
        costs.append(fvcore_gflops(ExitWithHandoff(exit_, hands), x, *upstream))
        with torch.no_grad():
            handoff = exit_(x, handoff, hand_logits=hands)[1]
    return costs


def test_dvt_t2t_vit_12_reference_gflops(dvt_12: DVT) -> None:
    assert dvt_12.exit_names == ("7x7", "10x10", "14x14")
    assert dvt_12.exit_gflops()[0] == pytest.approx(0.47, rel=0.02)  # DVT paper: exit 1 of DVT (T2T-ViT-12)
    assert dvt_12.static_gflops() == pytest.approx(1.78, rel=0.02)
    assert dvt_12.exit_gflops() == pytest.approx([0.4725, 1.4624, 3.4976], abs=5e-4)


@pytest.mark.parametrize("depth", [12, 14])
def test_every_exit_costs_what_fvcore_measures(depth: int, dvt_12: DVT, dvt_14: DVT) -> None:
    model = dvt_12 if depth == 12 else dvt_14
    measured = exit_costs_measured(model, torch.randn(1, 3, 224, 224))
    assert [e.gflops() for e in model.exits] == pytest.approx(measured, rel=1e-9)
    assert model.static_gflops() == pytest.approx(fvcore_gflops(model.static_baseline(), torch.randn(1, 3, 224, 224)))


def test_two_exit_costs_equal_fvcore_through_the_authors_upsampling() -> None:
    """7x7 -> 14x14 through 20x20 (configs/dvt_t2t_vit_12_2exit.yaml), in small: 4x4 -> 8x8 through 10x10."""
    model = DVT.from_name("t2t_vit_12", exit_kwargs=[SPLITS_32[0], SPLITS_32[2]], reuse_upsample=[10], **TINY_DVT).eval()
    measured = exit_costs_measured(model, torch.randn(1, 3, 32, 32))
    assert [e.gflops() for e in model.exits] == pytest.approx(measured, rel=1e-9)


def test_two_exit_config_cost(tmp_path: Path) -> None:
    report = flops_report("dvt_t2t_vit_12_2exit", tmp_path)
    assert [e["cumulative_gflops"] for e in report["exits"]] == pytest.approx([0.4725, 2.3741], abs=5e-4)


@pytest.mark.parametrize("depth", [12, 14])
def test_converter_places_every_tensor_of_the_authors_t2t_layout(depth: int, dvt_12: DVT, dvt_14: DVT) -> None:
    model = dvt_12 if depth == 12 else dvt_14
    layout = json.loads((AUTHORS_LAYOUT / f"dvt_t2t_vit_{depth}_authors_keys.json").read_text())
    theirs = {k: torch.randn(shape) for k, shape in layout.items()}
    converted = convert_authors_checkpoint(theirs, model.state_dict())
    assert len(converted) == len(theirs) and {id(v) for v in converted.values()} == {id(v) for v in theirs.values()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert missing == ["exit_thresholds"] and unexpected == []
    state = model.state_dict()  # the fixed tensors land too: random features and positions
    for key in ("less_token.tokens_to_token.attention1.w", "normal_token.pos_embed",
                "less_token.blocks.3.feature_resuse_mlp.1.fc2.weight", "normal_token.relation_reuse_conv.0.weight"):
        ours = next(k for k, v in converted.items() if v is theirs[key])
        torch.testing.assert_close(state[ours], theirs[key])


@pytest.mark.parametrize("splits, upsampled", [(SPLITS_32, None), ([SPLITS_32[0], SPLITS_32[2]], [10])],
                         ids=["3exits", "2exits"])
def test_converted_t2t_cascade_computes_the_authors_function(splits: list[dict], upsampled: list[int] | None) -> None:
    torch.manual_seed(0)
    model = DVT.from_name("t2t_vit_12", exit_kwargs=splits, reuse_upsample=upsampled, **TINY_DVT).eval()
    torch.manual_seed(3)
    theirs = in_authors_layout(model)  # random values everywhere, the random features included
    model.load_state_dict(convert_authors_checkpoint(theirs, model.state_dict()), strict=False)
    x = torch.randn(3, 3, 32, 32)
    exits = [(name, t2t_tokens(split["soft_split"])) for name, split in zip(authors_exit_names(len(splits)), splits)]
    with torch.no_grad():
        ours = model.forward_exits(x)
        reference = authors_forward(theirs, x, exits, heads=2, eps=1e-5, upsampled={8: upsampled[0]} if upsampled else None)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_init_from_the_authors_t2t_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hparams = dict(num_classes=10, img_size=32, patch_sizes=None, paddings=None, exit_kwargs=SPLITS_32,
                   reuse_hidden=16, reuse_dim=8,
                   backbone=BackboneSpec(name="t2t_vit_12", drop_path_rate=0.0, kwargs=TINY_T2T))
    theirs = in_authors_layout(DVTLitModule(**hparams).net)
    path = tmp_path / "dvt_t2t.pth.tar"
    torch.save({"model_state_dict": theirs, "flops": np.array([0.5, 1.5, 3.5]),
                "dynamic_threshold": [[0.91, 0.85, -1e8]]}, path)
    with caplog.at_level(logging.INFO):
        module = DVTLitModule(init_from=str(path), **hparams)
    assert "flops [0.5, 1.5, 3.5], dynamic_threshold [[0.91, 0.85, -100000000.0]]" in caplog.text
    ours = [v for k, v in module.net.state_dict().items() if k != "exit_thresholds"]
    for loaded, (key, value) in zip(ours, theirs.items(), strict=True):  # `theirs` is in our order
        torch.testing.assert_close(loaded, value, msg=key)


def test_demo_fit_validate_calibrates_then_test(run_cli, tmp_path: Path) -> None:  # noqa: ANN001
    config = ["--config", str(REPO / "configs/demo/dvt_t2t.yaml"), *FAST_TRAINER,
              "--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2, token_width: 8}",
              "--trainer.callbacks", "[{class_path: ThresholdCalibration, init_args: {budget_fractions: [0.6]}}]"]
    run_cli("fit", *config)
    run = Path("runs/demo_dvt_t2t/version_0")
    run_cli("validate", *config, "--ckpt_path", str(run / "checkpoints/last.ckpt"))
    calibrated = Path("runs/demo_dvt_t2t/version_1/calibrated.ckpt")
    assert calibrated.is_file()
    cli = run_cli("test", *config, "--ckpt_path", str(calibrated))
    net, policy = cli.model.net, cli.model.exit_policy
    assert net.exit_names == ("4x4", "6x6", "8x8") and type(net.exits[0].vit).__name__ == "T2TViT"
    assert net.exit_thresholds.tolist() == pytest.approx(policy.calibrations["fraction_0.6"]["thresholds"])
    gflops = float(cli.trainer.callback_metrics["test/gflops"])
    assert net.exit_gflops()[0] * (1 - 1e-6) <= gflops <= net.exit_gflops()[-1] * (1 + 1e-6)  # (float32 mean)
