"""MIA-Former: costs against fvcore, masked == sliced, block semantics, the three stages, CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from adaptive_vit.backbones import BackboneSpec
from adaptive_vit.flops import fvcore_gflops
from adaptive_vit.methods.mia.block import masked_block, sliced_block
from adaptive_vit.methods.mia.controller import RowConv3x3
from adaptive_vit.methods.mia.cost import controller_flops
from adaptive_vit.methods.mia.lit import MIALitModule, PolicyTerm, a2c_losses
from adaptive_vit.methods.mia.model import Decisions, MIAFormer
from benchmarks import mia_controllers
from conftest import FAST_TRAINER, REPO

TINY = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=4, num_heads=4)
TINY_LIT = dict(backbone=BackboneSpec(name="vit_tiny_patch16_224", img_size=32, patch_size=4, drop_path_rate=0.0,
                                     kwargs={"embed_dim": 64, "depth": 4, "num_heads": 4}), num_classes=10)


def tiny(**kwargs) -> MIAFormer:
    torch.manual_seed(0)
    return MIAFormer.from_name("vit_tiny_patch16_224", vit=TINY, **kwargs).eval()


def random_decisions(batch: int, net: MIAFormer, seed: int = 1) -> Decisions:
    g = torch.Generator().manual_seed(seed)
    L, H, N = net.depth, max(net.heads_per_layer), max(net.tokens_per_layer)
    heads = (torch.rand(batch, L, H, generator=g) > 0.4) & (torch.arange(H) < torch.tensor(net.heads_per_layer)[:, None])
    tokens = (torch.rand(batch, L, N, generator=g) > 0.5) & (torch.arange(N) < torch.tensor(net.tokens_per_layer)[:, None])
    return Decisions(torch.rand(batch, L, generator=g) > 0.3, heads, tokens)


class FixedMIA(nn.Module):
    """A fixed decision pattern as a static model: the MIA-Blocks' sliced compute, no controller."""

    def __init__(self, net: MIAFormer, decisions: Decisions) -> None:
        super().__init__()
        self.net, self.d = net, decisions

    def forward(self, x):
        return self.net.forward_blocks(x, self.d)


# ---------------------------------------------------------------------------------- costs


def test_deit_small_costs_and_controller_budget():
    net = MIAFormer.from_name("deit_small_patch16_224").eval()
    assert net.static_gflops() == pytest.approx(4.608, rel=5e-3)
    all_on = net.exit_gflops()[0]
    assert all_on <= 0.05 * net.static_gflops() + net.static_gflops()  # controllers ≤ 5 %
    controllers = all_on - net.static_gflops()
    assert controllers == pytest.approx(12 * sum(controller_flops(net.controllers[0], 196)) / 1e9)
    # one DeiT-S controller counted by fvcore == the analytic count
    x = torch.randn(1, 197, 384)
    assert fvcore_gflops(_AllBranches(net.controllers[0]), x) * 1e9 == pytest.approx(
        sum(controller_flops(net.controllers[0], 196)))


class _AllBranches(nn.Module):
    def __init__(self, controller):
        super().__init__()
        self.controller = controller

    def forward(self, x):
        out = self.controller(x)
        return [t for t in (out.block, out.heads, out.tokens) if t is not None]


@pytest.mark.parametrize("skips", [(True, True, True), (False, True, False), (True, False, True), (False, False, True)])
def test_controller_flops_match_fvcore(skips):
    net = tiny(skip_blocks=skips[0], skip_heads=skips[1], skip_tokens=skips[2])
    expected = sum(controller_flops(net.controllers[0], 64))
    assert fvcore_gflops(_AllBranches(net.controllers[0]), torch.randn(1, 65, 64)) * 1e9 == pytest.approx(expected)


@pytest.mark.parametrize("size", [(4, 4), (3, 2), (1, 1)])
def test_row_convolution_is_the_3x3_convolution_and_follows_its_weights(size):
    torch.manual_seed(0)
    rows_conv = RowConv3x3(5, 7, size)
    reference = nn.Conv2d(5, 7, 3, padding=1)
    reference.load_state_dict(rows_conv.state_dict())  # the same parameters, the same layout
    rows = torch.randn(2, size[0] * size[1], 5, requires_grad=True)
    as_map = rows.transpose(1, 2).unflatten(2, size)  # (B, C, h, w)
    expected = reference(as_map).flatten(2).transpose(1, 2)
    out = rows_conv(rows)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [rows, rows_conv.weight])
    expected_grads = torch.autograd.grad(expected.square().sum(), [rows, reference.weight])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # the cached taps weight is rebuilt after the weight changes in place
        torch.testing.assert_close(rows_conv(rows), expected)
        rows_conv.weight.mul_(2)
        reference.weight.mul_(2)
        torch.testing.assert_close(rows_conv(rows), reference(as_map).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("pattern", [{}, {"blocks": 0.25}, {"heads": 0.5}, {"tokens": 0.5},
                                     {"blocks": 0.25, "heads": 0.25, "tokens": 0.75}, "random"])
def test_analytic_flops_equal_fvcore_on_fixed_patterns(pattern):
    net = tiny()
    x = torch.randn(1, 3, 32, 32)
    d = random_decisions(1, net, seed=3) if pattern == "random" else net.fixed_decisions(1, **pattern)
    measured = fvcore_gflops(FixedMIA(net, d), x)
    analytic = net.forward_sliced(x, d).gflops.item()
    c = net.controllers[0]
    block_part, branches = controller_flops(c, 64)
    controllers = (4 * block_part + d.blocks.sum().item() * branches) / 1e9
    assert measured == pytest.approx(analytic - controllers, rel=1e-6)
    if pattern == {}:
        assert measured == pytest.approx(net.static_gflops(), rel=1e-6)


def test_cost_is_differentiable_through_the_masks():
    net = tiny().train()
    out = net.forward_masked(torch.randn(2, 3, 32, 32), "gumbel")
    out.gflops.sum().backward()
    for name in ("fc_b", "fc_h2", "fc_n"):
        assert getattr(net.controllers[1], name).weight.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------- paths


def check_masked_equals_sliced(net: MIAFormer, x: torch.Tensor):
    """Both paths (and the blocks alone) on random, fixed and the controllers' own decisions:
    the same logits and GFLOPs. Returns the sliced output of the controllers' decisions."""
    with torch.no_grad():
        for d in (random_decisions(len(x), net), net.fixed_decisions(len(x), 0.25, 0.5, 0.5), None):
            masked = net.forward_masked(x, "argmax", override=d)
            sliced = net.forward_sliced(x, d)
            torch.testing.assert_close(sliced.logits, masked.logits, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(sliced.gflops, masked.gflops)
            if d is not None:  # the blocks without any controller compute the same function
                torch.testing.assert_close(net.forward_blocks(x, d), sliced.logits)
    return sliced


def test_masked_and_sliced_paths_agree():
    net = tiny()
    x = torch.randn(5, 3, 32, 32)
    sliced = check_masked_equals_sliced(net, x)
    with torch.no_grad():
        # the controllers' own decisions: mixed per image (random init skips some of everything)
        assert 0 < sliced.decisions["blocks"].mean() < 1 and 0 < sliced.decisions["tokens"].mean() < 1
        # batched == one image at a time (grouping by head pattern, token padding)
        single = torch.cat([net.forward_sliced(x[i:i + 1]).logits for i in range(5)])
        torch.testing.assert_close(sliced.logits, single, atol=1e-5, rtol=1e-4)


def test_fused_and_explicit_attention_agree_in_the_sliced_path():
    from adaptive_vit.backbones import set_fused_attn

    net = tiny()
    x = torch.randn(3, 3, 32, 32)
    d = random_decisions(3, net)
    with torch.no_grad():
        set_fused_attn(net, False)
        explicit = net.forward_sliced(x, d).logits
        set_fused_attn(net, True)
        fused = net.forward_sliced(x, d).logits
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)


def _block_inputs(net, batch=2):
    torch.manual_seed(0)
    return torch.randn(batch, 65, 64), net.backbone.blocks[0]


def test_skipped_block_leaves_its_input_unchanged():
    net = tiny()
    x, block = _block_inputs(net)
    heads, tokens = torch.ones(2, 4), torch.ones(2, 65)
    out = masked_block(block, x, torch.tensor([0.0, 1.0]), heads, tokens)
    assert torch.equal(out[0], x[0]) and not torch.allclose(out[1], x[1])
    sliced = sliced_block(block, x, torch.tensor([1]), heads[:1].bool(), tokens[:1, 1:].bool())
    assert torch.equal(sliced[0], x[0])
    torch.testing.assert_close(sliced[1], out[1])


def test_inactive_channels_and_tokens_keep_their_residual():
    net = tiny()
    x, block = _block_inputs(net)
    with torch.no_grad():  # no attention output: only the MLP writes, so channels are visible
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
    heads = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    keep = torch.rand(2, 64) > 0.5
    tokens = torch.cat([torch.ones(2, 1), keep.float()], 1)
    with torch.no_grad():
        masked = masked_block(block, x, torch.ones(2), heads, tokens)
        sliced = sliced_block(block, x, torch.tensor([0, 1]), heads.bool(), keep)
    channels = heads.repeat_interleave(16, dim=1).bool()  # E = 16
    for out in (masked, sliced):
        changed = (out - x).abs() > 0
        for i in range(2):
            kept = tokens[i].bool()
            assert not changed[i][~kept].any()  # dropped tokens: residual only
            assert not changed[i][kept][:, ~channels[i]].any()  # inactive channels: residual only
            assert changed[i][kept][:, channels[i]].float().mean() > 0.9
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dimension", ["blocks", "heads", "tokens"])
def test_each_switch_removes_its_decisions(dimension):
    net = tiny(**{f"skip_{dimension}": False}).train()
    names = {"blocks": "fc_b", "heads": "fc_h2", "tokens": "fc_n"}
    assert not hasattr(net.controllers[0], names[dimension])
    x = torch.randn(4, 3, 32, 32)
    kept = net.forward_masked(x, "gumbel").decisions._asdict()[dimension]
    assert torch.all(kept == 1)
    others = [d for d in ("blocks", "heads", "tokens") if d != dimension]
    assert any((net.forward_masked(x, "gumbel").decisions._asdict()[d] == 0).any() for d in others)
    with torch.no_grad():
        decisions = net.eval().forward_sliced(x).decisions
    if dimension == "blocks":
        assert torch.all(decisions["blocks"] == 1)
    else:  # executed blocks run all heads / all tokens
        assert torch.equal(decisions[dimension], decisions["blocks"])


# ---------------------------------------------------------------------------------- stages


def lit(**kwargs) -> MIALitModule:
    torch.manual_seed(0)
    return MIALitModule(**TINY_LIT, **kwargs)


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_stage1_reaches_no_skipping_and_equals_the_backbone():
    module = lit(stage=1)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.1)
    assert not any(p.requires_grad for p in module.net.backbone.parameters())  # blocks frozen
    before = {k: v.clone() for k, v in module.net.backbone.state_dict().items()}
    x, y = _batch(8)
    for step in range(40):  # until nothing is skipped (the paper: until the loss reaches 0)
        module.train()
        loss, logs = module.compute_loss(module.net.forward_train(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.eval()
        with torch.no_grad():
            out = module.net.forward_adaptive(x)
        if all(torch.all(out.decisions[d] == 1) for d in ("blocks", "heads", "tokens")):
            break
    assert step < 39, "stage 1 did not reach zero skipping"
    with torch.no_grad():
        torch.testing.assert_close(out.logits, module.net.backbone(x), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, module.net.backbone.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("phase, isolated", [("1", True), ("2", False)])
def test_in_stage1_each_controller_learns_from_its_own_decisions_only(phase, isolated):
    """Stage 1's "keep" loss of a later block must not reach earlier controllers through the
    straight-through masks (it pushed them to skip on the demo); co-training keeps that path."""
    module = lit(stage=1)
    module.enter_phase(phase)
    assert module.net.isolate_controllers == isolated
    module.train()
    kept = module.net.kept_fractions(module.net.forward_train(_batch(8)[0]).decisions)
    last_block_loss = (1 - kept.blocks[:, -1]) + (1 - kept.heads[:, -1]) + (1 - kept.tokens[:, -1])
    last_block_loss.mean().backward()
    first, last = module.net.controllers[0], module.net.controllers[-1]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in last.parameters())
    reached_first = any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    assert reached_first != isolated


@pytest.mark.parametrize("side", ["above", "below"])
def test_stage2_moves_mean_gflops_towards_the_target(side):
    module = lit(stage=2, lr_controller=1e-2, lr_blocks=0.0)
    module.net.train()
    x, y = _batch(8)
    with torch.no_grad():
        start = module.net.forward_masked(x, "argmax").gflops.mean().item()
    # above: the mean cost is over the target; below: under it (all-on is the most it can be)
    module.hparams.target_gflops = start * 0.5 if side == "above" else module.net.exit_gflops()[0]
    params = [p for p in module.net.controllers.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-2)
    signs = []
    for _ in range(8):
        loss, logs = module.compute_loss(module.net.forward_train(x), y)
        signs.append(bool(logs["alpha"] > 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert signs[0] == (side == "above")  # α's sign follows the side of the target
    with torch.no_grad():
        end = module.net.forward_masked(x, "argmax").gflops.mean().item()
    if side == "above":  # too expensive: the cost term pushes the mean cost down
        assert end < start
    else:  # below the target: negative alpha pushes it up
        assert end > start


def test_stage3_inherits_the_configured_fraction(tmp_path):
    source = lit(stage=2)
    path = tmp_path / "stage2.pt"
    torch.save(source.net.state_dict(), path)
    for fraction in (0.75, 1.0):
        module = lit(stage=3, init_from=str(path), inherit_fraction=fraction)
        assert bool(module.net.policy_initialised)
        kept = total = 0
        for new, old in zip(module.net.controllers, source.net.controllers):
            critics = {id(p) for c in new.critics() for p in c.parameters()}
            for p_new, p_old in zip(new.parameters(), old.parameters()):
                if id(p_new) not in critics:
                    kept += (p_new == p_old).sum().item()
                    total += p_new.numel()
        assert kept / total == pytest.approx(fraction, abs=0.01)
        assert all(torch.equal(a, b) for a, b in zip(module.net.backbone.parameters(), source.net.backbone.parameters()))
        # agent-only first: blocks frozen, critics trained, decisions sampled
        assert not any(p.requires_grad for p in module.net.backbone.parameters())
        assert all(p.requires_grad for p in module.net.controllers[0].critic_b.parameters())
        assert module.net.train_decisions == "sample"


def test_policy_gradient_has_the_right_sign():
    # two images, one decision each: image 0 kept (reward 1), image 1 skipped (reward 0), V = 0.5
    logits = torch.zeros(2, 1, 2, requires_grad=True)
    values = torch.full((2, 1), 0.5, requires_grad=True)
    term = PolicyTerm(logits, torch.tensor([[1.0], [0.0]]), values, torch.ones(2, 1))
    actor, critic, entropy = a2c_losses([term], torch.tensor([1.0, 0.0]))
    (actor + critic).backward()
    step = -logits.grad[:, 0]  # gradient descent direction
    assert step[0, 1] > 0 > step[0, 0]  # rewarded action "keep" becomes more likely
    assert step[1, 1] > 0 > step[1, 0]  # below-baseline action "skip" becomes less likely
    # critic: V moves towards R
    assert -values.grad[0, 0] > 0 > -values.grad[1, 0]
    assert entropy.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_stage3_a2c_learns_to_prefer_cheap_policies():
    module = lit(stage=3, reward_beta=50.0, entropy_weight=0.0)
    module.net.train()
    x, y = _batch(8)
    opt = torch.optim.Adam([p for p in module.net.controllers.parameters() if p.requires_grad], lr=3e-2)
    module.hparams.target_gflops = 0.0  # every FLOP costs reward
    with torch.no_grad():
        start = module.net.forward_masked(x, "argmax").gflops.mean().item()
    for _ in range(10):
        loss, logs = module.compute_loss(module.net.forward_train(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert module.net.forward_masked(x, "argmax").gflops.mean().item() < start


def test_pipeline_schedule_and_errors():
    module = lit(stage=1, stage_epochs=[1, 2, 1, 2])
    assert [module.phase_at(e) for e in range(6)] == ["1", "2", "2", "3a", "3j", "3j"]
    assert module.phase == "1" and module.net.train_decisions == "gumbel"
    assert lit(stage=2, stage_epochs=[5, 2, 0, 1]).schedule() == [("2", 2), ("3j", 1)]
    with pytest.raises(ValueError, match="4 non-negative"):
        lit(stage_epochs=[1, 2])
    with pytest.raises(ValueError, match="stage must be"):
        lit(stage=4)


# ---------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_stage3_reward_pushes_towards_the_target_from_either_side():
    module = lit(stage=3)
    module.net.train()
    x, y = _batch(8)
    output = module.net.forward_train(x)
    total = module.net.exit_gflops()[0]
    correct = (output.logits.argmax(-1) == y).float()
    # above the target (0) saving is rewarded; below it (all-on) spending is
    for target, sign in ((0.0, 1.0), (total, -1.0)):
        module.hparams.target_gflops = target
        expected = sign * module.hparams.reward_beta * (target - output.gflops.detach()) / total
        torch.testing.assert_close(module.reward(output, y) - correct, expected)


def test_stage2_on_the_demo_ends_within_5_percent_of_the_target(run_cli):
    """Co-training from scratch on the bundled digits, 40 steps: evaluation (argmax decisions,
    real skipping) lands on the FLOPs target."""
    target = 0.011
    cli = run_cli("fit", "--config", str(REPO / "configs/demo/mia.yaml"), "--model.init_args.stage", "2",
                  "--model.init_args.stage_epochs", "null", "--model.init_args.target_gflops", str(target),
                  "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "40",
                  "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]")
    assert float(cli.trainer.callback_metrics["val/gflops"]) == pytest.approx(target, rel=0.05)


@pytest.mark.parametrize("stage1_lr", [0.0, 0.1])
def test_stage1_ending_with_skipping_is_warned_about(run_cli, stage1_lr):
    """Stage 1 must end with nothing skipped (the model equals its backbone): fresh controllers
    that did not learn (lr 0) still skip and are warned about; a high lr reaches all-on."""
    args = ["fit", "--config", str(REPO / "configs/demo/mia.yaml"), *FAST_TRAINER,
            "--model.init_args.stage_epochs", "[1, 1, 0, 0]", "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "10", "--model.init_args.stage1_lr", str(stage1_lr)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(*args)
    warned = [w for w in caught if "stage 1 ended with the controllers still skipping" in str(w.message)]
    assert len(warned) == (1 if stage1_lr == 0.0 else 0)


def test_cli_static_then_mia_pipeline_then_test(run_cli, tmp_path):
    static_then_mia_pipeline(run_cli, tmp_path, [], REPO / "configs/demo/mia.yaml", "demo_mia")


def static_then_mia_pipeline(run_cli, tmp_path, backbone: list[str], config, run: str):  # noqa: ANN001
    """The static demo (its backbone overridden by `backbone`) for two batches, then the MIA-Former
    demo `config` from it through the three stages (one epoch each), then `test` on its checkpoint;
    returns the test's CLI."""
    static = REPO / "configs/demo/static.yaml"
    small = ["--data.init_args.batch_size", "16", "--trainer.limit_train_batches", "2", "--trainer.log_every_n_steps", "1"]
    run_cli("fit", "--config", str(static), *FAST_TRAINER, *small, *backbone)
    static_ckpt = tmp_path / "runs/demo_static/version_0/checkpoints/last.ckpt"
    assert static_ckpt.exists()
    args = [*FAST_TRAINER, *small, "--model.init_args.init_from", str(static_ckpt),
            "--model.init_args.stage_epochs", "[1, 1, 1, 1]", "--trainer.max_epochs", "4"]
    cli = run_cli("fit", "--config", str(config), *args)
    assert cli.model.phase == "3j"
    optimizer = cli.trainer.optimizers[0]  # re-created at the stage switches (stage 1 is Adam)
    assert type(optimizer) is torch.optim.AdamW
    assert {g["initial_lr"] for g in optimizer.param_groups} == {cli.model.hparams.lr_blocks, cli.model.hparams.lr_controller}
    ckpt = tmp_path / f"runs/{run}/version_0/checkpoints/last.ckpt"
    metrics = (tmp_path / f"runs/{run}/version_0/metrics.csv").read_text()
    for name in ("train/pretrain_loss", "train/cost_loss", "train/reward", "train/skip_tokens", "val/gflops"):
        assert name in metrics, name
    test = run_cli("test", "--config", str(config), *args, "--ckpt_path", str(ckpt))
    assert 0.0 < test.trainer.callback_metrics["test/gflops"] <= test.model.net.exit_gflops()[0] + 1e-9
    return test


def test_cli_flops_json(run_cli, capsys):
    run_cli("flops", "--config", str(REPO / "configs/mia_deit.yaml"), "--format", "json")
    out = capsys.readouterr().out
    report, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
    assert report["model"] == "MIAFormer"
    assert report["static_gflops"] == pytest.approx(4.608, rel=5e-3)
    assert len(report["exits"]) == 1
    assert report["static_gflops"] < report["exits"][0]["cumulative_gflops"] <= 1.05 * report["static_gflops"]


def test_controllers_benchmark_times_every_pattern_with_and_without_controllers():
    net = tiny()
    rows = {r["mode"]: r for r in mia_controllers.measure(net, batch_size=2, repeats=1, warmup=0)}
    patterns = list(net.fixed_patterns(2))
    dense = [m for m in rows if m.startswith("dense ")]
    assert list(rows) == ["static"] + [m for p in patterns for m in (p, f"{p}, blocks alone")] + dense
    # TINY (depth 4, width 64, 4 heads, MLP 256): depth 3, depth 2, MLP 128, width 32 with 2 heads
    assert dense == ["dense L3 D64 H4 M256", "dense L2 D64 H4 M256", "dense L4 D64 H4 M128", "dense L4 D32 H2 M128"]
    for label, model in mia_controllers.dense_references(net).items():
        # the row's GFLOPs are fvcore's count of the model it timed, fewer than the backbone's
        assert rows[label]["gflops"] == pytest.approx(fvcore_gflops(model, torch.randn(1, 3, 32, 32)))
        assert rows[label]["gflops"] < net.static_gflops()
    controllers = net.cost.total() / 1e9 - net.static_gflops()
    # all on: with the controllers every one of them is counted, without them the plain backbone
    assert rows["all on"]["gflops"] == pytest.approx(net.static_gflops() + controllers)
    assert rows["all on, blocks alone"]["gflops"] == pytest.approx(net.static_gflops())
    for p in patterns:
        assert rows[f"{p}, blocks alone"]["gflops"] < rows[p]["gflops"]
        assert rows[p]["latency_ms"] > 0 and rows[p]["efficiency"] > 0
        # controllers at their FLOPs share: a mix of the blocks' own efficiency and 1 (the static rate)
        bound, alone = rows[p]["efficiency_at_flops_share"], rows[f"{p}, blocks alone"]["efficiency"]
        assert min(alone, 1.0) - 1e-9 <= bound <= max(alone, 1.0) + 1e-9
        assert "efficiency_at_flops_share" not in rows[f"{p}, blocks alone"]


def test_efficiency_at_flops_share_on_constructed_rows():
    # static: 100 ms for 4 GFLOPs; blocks alone 40 ms for 1.5 GFLOPs, controllers 0.5 GFLOPs →
    # 12.5 ms at the static rate; the pattern (2 GFLOPs, 2x fewer) would take 52.5 ms: 1.905x
    static = {"latency_ms": 100.0, "gflops": 4.0}
    alone = {"latency_ms": 40.0, "gflops": 1.5}
    pattern = {"latency_ms": 70.0, "gflops": 2.0, "flops_reduction": 2.0}
    assert mia_controllers.efficiency_at_flops_share(pattern, alone, static) == pytest.approx(100 / 52.5 / 2)


def test_time_after_times_only_the_run_right_after_each_context():
    log = []
    contexts = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    times = mia_controllers.time_after(contexts, lambda: log.append("run"), repeats=3)
    assert log == ["a", "run", "b", "run"] * 3  # in turns, the run right after each context
    assert list(times) == ["a", "b"] and all(ms >= 0 for ms in times.values())


def test_controller_in_context_times_the_middle_controller(monkeypatch):
    net = tiny()
    layers, decide = [], net._decide_sliced

    def recorded(controller, x, layer, override):
        layers.append((controller, layer, tuple(x.shape)))
        return decide(controller, x, layer, override)

    monkeypatch.setattr(net, "_decide_sliced", recorded)
    times = mia_controllers.controller_in_context(net, batch_size=2, repeats=2, flush_mb=1)
    assert list(times) == ["warm (right after itself)", "right after one block", "after an add over 1 MB"]
    assert all(ms > 0 for ms in times.values())
    # the middle block's controller on a (B, 1 + N, D) block input, every context timed twice
    # (the warm context's own call included)
    assert set(layers) == {(net.controllers[2], 2, (2, 65, 64))}
    assert len(layers) == 2 * 4


def test_cli_benchmark_fixed_patterns(run_cli, capsys):
    run_cli("benchmark", "--config", str(REPO / "configs/demo/mia.yaml"), "--batch_sizes", "[1, 3]",
            "--repeats", "1", "--warmup", "0", "--format", "json")
    out = capsys.readouterr().out
    rows, _ = json.JSONDecoder().raw_decode(out[out.index("["):])
    gflops = {(r["mode"], r["batch_size"]): r["gflops"] for r in rows}
    for batch in (1, 3):
        assert gflops[("all on", batch)] > gflops[("static", batch)]  # controllers included
        for dim in ("blocks", "heads", "tokens"):
            assert gflops[(f"{dim} -50%", batch)] < gflops[(f"{dim} -25%", batch)] < gflops[("all on", batch)]


def test_gradients_reach_the_input_through_the_sliced_path():
    # the robustness callback attacks `forward` (the sliced path): gradients must reach pixels
    net = tiny()
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    net(x).logsumexp(-1).sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy, refused", [("ddp", True), ("ddp_find_unused_parameters_true", False)])
def test_phase_switching_under_plain_ddp_is_refused_with_the_fix(strategy: str, refused: bool) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import StrategyRegistry

    module = MIALitModule(**TINY_LIT, stage_epochs=[1, 1, 1, 1])
    module.trainer = SimpleNamespace(world_size=2, strategy=StrategyRegistry.get(strategy))
    if refused:
        with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
            module.setup("fit")
    else:
        module.setup("fit")
        assert all(p.requires_grad for p in module.net.parameters())


def test_sliced_path_runs_under_autocast_as_timm_does():
    # test and validation under `--trainer.precision bf16-mixed` / `16-mixed` run the sliced path in
    # autocast: the linears give half precision, the residual stream stays float32
    net = tiny()
    x = torch.randn(4, 3, 32, 32)
    d = random_decisions(4, net)  # per-image head sets (several groups), tokens dropped unevenly
    with torch.no_grad():
        reference = net.forward_sliced(x, d).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net.forward_sliced(x, d)
            all_on = net.forward_sliced(x, net.fixed_decisions(4))
            static = net.backbone(x)
    torch.testing.assert_close(mixed.logits.float(), reference, atol=2e-2, rtol=2e-2)
    # all on: the sliced blocks accumulate the stream as timm's blocks do, in the same dtypes
    torch.testing.assert_close(all_on.logits, static, atol=1e-2, rtol=1e-2)
