"""LeViT: the backbone family (timm's levit_*, costs, offline weights, errors) and MIA-Former over it
(masked == sliced, analytic GFLOPs == fvcore, BatchNorm statistics, configs, the demo pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adaptive_vit.backbones import BackboneSpec, build_backbone
from adaptive_vit.flops import fvcore_gflops
from adaptive_vit.methods import CFViTLitModule, StaticViTLitModule
from adaptive_vit.methods.mia.block import sliced_block, split_bounds
from adaptive_vit.methods.mia.cost import controller_flops
from adaptive_vit.methods.mia.model import Decisions, MIAFormer
from conftest import REPO
from test_mia import FixedMIA, _AllBranches, check_masked_equals_sliced, random_decisions, static_then_mia_pipeline

# 32x32 images, the 8-pixel stem: stages of 4x4, 2x2 and 1x1 tokens; widths 48, 40 (not a multiple of
# its 3 heads' groups: 13/13/14 channels) and 64.
TINY_LEVIT = dict(embed_dim=[48, 40, 64], key_dim=8, num_heads=[3, 3, 4], depth=[2, 1, 1], stem_type="s8")
# configs/demo/mia_levit.yaml's backbone, for the static demo run it starts from
DEMO_BACKBONE = ["--model.init_args.backbone.name", "levit_192", "--model.init_args.backbone.patch_size", "8",
                 "--model.init_args.backbone.kwargs", "{embed_dim: [64, 96], key_dim: 16, num_heads: [4, 6], depth: [2, 2]}"]


def tiny_levit(seed: int = 0) -> nn.Module:
    """A tiny LeViT with random values everywhere (biases, BatchNorm statistics included: zero
    biases and unit statistics would hide mistakes)."""
    torch.manual_seed(seed)
    model = build_backbone(BackboneSpec(name="levit_192", img_size=32, drop_path_rate=0.0, kwargs=TINY_LEVIT), 10)[0]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_var.abs_().add_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def net() -> MIAFormer:
    return MIAFormer(tiny_levit(), pool=2).eval()


def flops_report(run_cli, capsys, config: str) -> dict:  # noqa: ANN001
    run_cli("flops", "--config", str(REPO / f"configs/{config}.yaml"), "--format", "json")
    out = capsys.readouterr().out
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]


# ---------------------------------------------------------------------------------- backbone


def test_analytic_gflops_equal_fvcore() -> None:
    model = tiny_levit()
    family_gflops = build_backbone(BackboneSpec(name="levit_192", img_size=32, kwargs=TINY_LEVIT), 10)[1].gflops(model)
    assert family_gflops == pytest.approx(fvcore_gflops(model, torch.randn(1, 3, 32, 32)), rel=1e-9)


@pytest.mark.parametrize("size, gflops", [(192, 0.66), (256, 1.12)])
def test_static_and_mia_configs_cost_the_papers_gflops(size: int, gflops: float, run_cli, capsys) -> None:  # noqa: ANN001
    static = flops_report(run_cli, capsys, f"static_levit_{size}")
    assert static["model"] == "StaticViT" and static["static_gflops"] == pytest.approx(gflops, rel=0.02)
    mia = flops_report(run_cli, capsys, f"mia_levit_{size}")
    assert mia["static_gflops"] == static["static_gflops"]
    # all on: the backbone and every controller, the controllers at most 5 % of it
    assert static["static_gflops"] < mia["exits"][0]["cumulative_gflops"] <= 1.05 * static["static_gflops"]


def test_levit_256_analytic_gflops_equal_fvcore() -> None:
    model, family = build_backbone(BackboneSpec(name="levit_256"), 1000)
    assert family.gflops(model) == pytest.approx(fvcore_gflops(model, torch.randn(1, 3, 224, 224)), rel=1e-9)


def test_weights_from_a_local_file(tmp_path: Path) -> None:
    source = tiny_levit()
    path = tmp_path / "levit.pth"
    torch.save(source.state_dict(), path)
    spec = BackboneSpec(name="levit_192", img_size=32, pretrained=str(path), kwargs=TINY_LEVIT)
    same = build_backbone(spec, 10)[0].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same(x), source(x))
    other = build_backbone(spec, 7)[0]  # another class count: the classifiers start fresh
    assert other.head.linear.out_features == 7
    torch.testing.assert_close(other.stages[1].blocks[0].attn.attention_biases, source.stages[1].blocks[0].attn.attention_biases)


@pytest.mark.parametrize("spec, message", [
    (BackboneSpec(name="levit_conv_192"), "use 'levit_192'"),
    (BackboneSpec(name="levit_192", patch_size=4), "set patch_size to 16 or 8"),
    (BackboneSpec(name="levit_192", patch_size=16, kwargs={"stem_type": "s8"}), "set patch_size to 16 or 8"),
    (BackboneSpec(name="levit_192", fused_attn=True), "leave backbone.fused_attn unset"),
    (BackboneSpec(name="levit_193"), "did you mean|not a timm model"),
])
def test_bad_levit_specs_say_what_to_change(spec: BackboneSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_backbone(spec, 10)


def test_static_levit_trains_and_cfvit_refuses_it() -> None:
    spec = BackboneSpec(name="levit_192", img_size=32, drop_path_rate=0.0, kwargs=TINY_LEVIT)
    module = StaticViTLitModule(backbone=spec, num_classes=10)
    loss, _ = module.compute_loss(module.net.forward_train(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    assert module.net.exit_gflops()[0] == pytest.approx(fvcore_gflops(module.net.backbone, torch.randn(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="CF-ViT needs a ViT with one cls token"):
        CFViTLitModule(backbone=spec, coarse_grid=2, num_classes=10)


# ---------------------------------------------------------------------------------- MIA-Former


def test_stages_controllers_and_head_groups(net: MIAFormer) -> None:
    assert net.heads_per_layer == [3, 3, 3, 4] and net.tokens_per_layer == [16, 16, 4, 1]
    assert [c.prefix for c in net.controllers] == [0] * 4  # no class token: every token is decided
    assert split_bounds(40, 3) == (0, 13, 26, 40) and split_bounds(80, 3) == (0, 26, 53, 80)


def test_masked_and_sliced_paths_agree(net: MIAFormer) -> None:
    x = torch.randn(5, 3, 32, 32)
    check_masked_equals_sliced(net, x)
    with torch.no_grad():
        # some image keeps no token of the 1x1 stage while others keep theirs (padding, no prefix)
        d = random_decisions(5, net)
        assert 0 < d.tokens[:, 3, 0].sum() < 5
        single = torch.cat([net.forward_sliced(x[i:i + 1], Decisions(*(t[i:i + 1] for t in d))).logits for i in range(5)])
        torch.testing.assert_close(net.forward_sliced(x, d).logits, single, atol=1e-5, rtol=1e-4)
        # all on: the plain timm LeViT
        torch.testing.assert_close(net.forward_sliced(x, net.fixed_decisions(5)).logits, net.backbone(x),
                                   atol=1e-5, rtol=1e-4)


def test_kept_tokens_keep_their_own_position_biases(net: MIAFormer) -> None:
    """Dropping a token must not shift the others' biases: with one token dropped, the others'
    update equals the full attention over the kept tokens, biases read at their positions."""
    block = net.backbone.stages[0].blocks[0]
    attn = block.attn
    x = torch.randn(1, 16, 48)
    keep = torch.ones(1, 16, dtype=torch.bool)
    keep[0, 5] = False
    with torch.no_grad():
        out = sliced_block(block, x, torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool), keep)
        q, k, v = attn.qkv(x).view(1, 16, 3, -1).split([8, 8, 16], dim=3)
        bias = attn.get_attention_biases(x.device)  # (H, 16, 16)
        logits = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * attn.scale + bias
        logits[..., 5] = float("-inf")  # token 5 is no key
        a = attn.proj((logits.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(1, 16, -1))
        expected = x + a
        expected = expected + block.mlp(expected)
    torch.testing.assert_close(out[0, keep[0]], expected[0, keep[0]], atol=1e-5, rtol=1e-4)
    assert torch.equal(out[0, 5], x[0, 5])  # the dropped token keeps its value


@pytest.mark.parametrize("pattern", [{}, {"blocks": 0.25}, {"heads": 0.5}, {"tokens": 0.5},
                                     {"blocks": 0.25, "heads": 0.25, "tokens": 0.75}, "random"])
def test_analytic_flops_equal_fvcore_on_fixed_patterns(net: MIAFormer, pattern) -> None:  # noqa: ANN001
    x = torch.randn(1, 3, 32, 32)
    d = random_decisions(1, net, seed=4) if pattern == "random" else net.fixed_decisions(1, **pattern)
    measured = fvcore_gflops(FixedMIA(net, d), x)
    analytic = net.forward_sliced(x, d).gflops.item()
    controllers = 0.0
    for l, controller in enumerate(net.controllers):  # the always-run part, the branches if executed
        block_part, branches = controller_flops(controller, net.tokens_per_layer[l])
        controllers += block_part + d.blocks[0, l].item() * branches
    assert measured == pytest.approx(analytic - controllers / 1e9, rel=1e-6)
    if pattern == {}:
        assert measured == pytest.approx(net.static_gflops(), rel=1e-6)


def test_controller_flops_match_fvcore(net: MIAFormer) -> None:
    for l in (0, 2, 3):  # each stage's controller (no prefix token), the 1x1 stage's pool clipped
        controller = net.controllers[l]
        x = torch.randn(1, net.tokens_per_layer[l], controller.dim)
        assert fvcore_gflops(_AllBranches(controller), x) * 1e9 == pytest.approx(
            sum(controller_flops(controller, net.tokens_per_layer[l])))


def test_training_keeps_batchnorm_statistics_and_equals_the_sliced_path() -> None:
    net = MIAFormer(tiny_levit(), pool=2).train()
    assert not any(m.training for m in net.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    before = {k: v.clone() for k, v in net.backbone.state_dict().items() if "running" in k}
    x = torch.randn(4, 3, 32, 32)
    d = random_decisions(4, net, seed=2)
    masked = net.forward_masked(x, "gumbel", override=d)
    masked.logits.sum().backward()
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in before.items())
    assert net.backbone.stages[0].blocks[0].mlp.ln1.bn.weight.grad is not None  # the affine part trains
    with torch.no_grad():
        torch.testing.assert_close(net.eval().forward_sliced(x, d).logits, masked.logits.detach(), atol=1e-5, rtol=1e-4)


def test_decision_maps_on_the_first_grid(net: MIAFormer) -> None:
    maps = net.decision_maps(torch.randn(2, 3, 32, 32))
    assert maps["tokens"].shape == (2, 4, 4, 4) and maps["heads"].shape == (2, 4, 4)


def test_demo_static_then_mia_pipeline_then_test(run_cli, tmp_path: Path) -> None:  # noqa: ANN001
    test = static_then_mia_pipeline(run_cli, tmp_path, DEMO_BACKBONE, REPO / "configs/demo/mia_levit.yaml",
                                    "demo_mia_levit")
    assert type(test.model.net.backbone).__name__ == "LevitDistilled" and test.model.net.depth == 4
