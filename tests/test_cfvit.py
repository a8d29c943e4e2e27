"""CF-ViT: token counts, class attention, selection, early exit, loss, costs, converter, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_vit.backbones import BackboneSpec, build_backbone
from adaptive_vit.backbones import set_fused_attn
from adaptive_vit.data import ImageDataModule
from adaptive_vit.flops import fvcore_gflops
from adaptive_vit.methods.cfvit.convert import authors_key
from adaptive_vit.methods.cfvit.lit import CFViTLitModule
from adaptive_vit.methods.cfvit.model import CFViT, CoarseOutput, TrainOutput, num_fine_tokens
from conftest import FAST_TRAINER, REPO

AUTHORS_KEYS = REPO / "tests/reference/cfvit_deit_small_7x7_authors_keys.json"
TINY = dict(embed_dim=32, depth=2, num_heads=2)


def tiny_net(grid: int = 4, alpha: float = 0.5, start: int = 0, fused: bool = False,
             depth: int = 2, backbone: str = "vit_tiny_patch16_224") -> CFViT:
    """A CF-ViT on (3, 8g, 8g) images with 4-pixel patches: g×g coarse, 2g×2g fine tokens.

    `backbone`: ``vit_tiny_patch16_224`` (a timm ViT) or ``lvvit_s`` (LV-ViT: conv stem, token head)."""
    torch.manual_seed(0)
    kwargs = {**TINY, "depth": depth, **({"stem_width": 8} if backbone == "lvvit_s" else {})}
    vit, _ = build_backbone(BackboneSpec(backbone, img_size=8 * grid, patch_size=4, drop_path_rate=0.0,
                                         fused_attn=fused, kwargs=kwargs), 10)
    net = CFViT(vit, alpha=alpha, cls_attn_start=start)
    with torch.no_grad():  # spread the confidences of random heads; BatchNorms away from the identity
        for head in (m for name, m in vit.named_children() if name in ("head", "aux_head")):
            head.weight.mul_(40)
        for bn in (m for m in vit.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.normal_(1, 0.1)
            bn.bias.normal_(0, 0.1)
    return net.eval()


def block_inputs(net: CFViT) -> list[torch.Tensor]:
    """Record every input of the first block (coarse and fine stage sequences)."""
    seen: list[torch.Tensor] = []
    net.vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


# ----------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("alpha", [0.25, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("grid", [2, 4, 7, 9])
def test_fine_token_formula(alpha: float, grid: int) -> None:
    coarse = grid * grid
    assert num_fine_tokens(alpha, coarse) == 4 * math.ceil(alpha * coarse) + math.floor((1 - alpha) * coarse)


@pytest.mark.parametrize(("grid", "alpha"), [(2, 0.5), (4, 0.3), (4, 0.5), (4, 1.0), (3, 0.75)])
def test_fine_stage_runs_on_nf_tokens(grid: int, alpha: float) -> None:
    net = tiny_net(grid, alpha)
    seen = block_inputs(net)
    with torch.no_grad():
        net.forward_exits(torch.randn(2, 3, 8 * grid, 8 * grid))
    coarse = grid * grid
    expected = 4 * math.ceil(alpha * coarse) + math.floor((1 - alpha) * coarse)
    assert [t.shape[1] for t in seen] == [1 + coarse, 1 + expected]


def test_deit_small_token_counts_and_flops_references() -> None:
    net = CFViT.from_name("deit_small_patch16_224")
    assert (net.num_coarse, net.num_fine) == (49, 124)
    coarse, fine = net.exit_gflops()
    assert coarse == pytest.approx(1.102, rel=5e-3)  # docs/methods.md, FLOPs convention: DeiT-S on a 112 image
    assert fine == pytest.approx(4.0, rel=0.02)  # paper: coarse + fine ≈ 4.0
    assert net.static_gflops() == pytest.approx(4.608, rel=5e-3)
    assert net.input_size() == (3, 224, 224)
    nine = CFViT.from_name("deit_small_patch16_224", img_size=288)
    assert (nine.num_coarse, nine.num_fine, nine.coarse_pos_embed.shape[1]) == (81, 204, 82)


def fvcore_stage_gflops(net: CFViT, x: torch.Tensor) -> list[float]:
    """[coarse, coarse + fine] GFLOPs of the stages as they run, counted by fvcore on one image."""

    class Coarse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.coarse_stage(x).logits

    class Fine(Coarse):
        def forward(self, x, features, embedding, attention):  # noqa: ANN001, ANN202
            return self.net.fine_stage(x, CoarseOutput(None, features, embedding, attention))

    with torch.no_grad():
        out = net.eval().coarse_stage(x)
    coarse = fvcore_gflops(Coarse(), x)
    fine = fvcore_gflops(Fine(), x, out.features, out.embedding, out.attention)
    return [coarse, coarse + fine]


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "lvvit_s"])
@pytest.mark.parametrize(("grid", "alpha"), [(4, 0.5), (3, 0.3)])
def test_analytic_costs_equal_fvcore(grid: int, alpha: float, backbone: str) -> None:
    net = tiny_net(grid, alpha, depth=3, backbone=backbone)
    x = torch.randn(1, 3, 8 * grid, 8 * grid)
    assert net.exit_gflops() == pytest.approx(fvcore_stage_gflops(net, x), rel=1e-9)


# ----------------------------------------------------------------------------- class attention


def test_global_class_attention_equals_explicit_maps() -> None:
    net = tiny_net(grid=4, start=1, depth=4)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = net.coarse_stage(x).attention
        small = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=True)
        tokens = torch.cat([
            (net.vit.cls_token + net.coarse_pos_embed[:, :1]).expand(3, -1, -1),
            net.family.tokenize(net.vit, small) + net.coarse_pos_embed[:, 1:],
        ], 1)
        expected = torch.zeros(3, 16)
        for index, block in enumerate(net.vit.blocks):
            tokens, logits = block(tokens, tap="logits")  # (B, H, N, N) pre-softmax
            if index >= 1:
                cls_row = logits.softmax(-1)[:, :, 0, 1:].mean(1)
                expected = 0.99 * expected + 0.01 * cls_row
    torch.testing.assert_close(got, expected)


def test_side_computed_cls_row_equals_unfused_path() -> None:
    x = torch.randn(3, 3, 32, 32)
    explicit, fused = tiny_net(start=0), tiny_net(start=0, fused=True)
    with torch.no_grad():
        a, b = explicit.coarse_stage(x), fused.coarse_stage(x)
    torch.testing.assert_close(a.attention, b.attention)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- fine stage


def test_selection_is_top_k_and_fine_tokens_are_built_as_specified() -> None:
    net = tiny_net(grid=4, alpha=0.5)
    x = torch.randn(2, 3, 32, 32)
    seen = block_inputs(net)
    with torch.no_grad():
        coarse = net.coarse_stage(x)
        informative, rest = net.select(coarse)
        net.fine_stage(x, coarse)
        full = net.vit.patch_embed(x) + net.vit.pos_embed[:, 1:]  # every fine patch, (B, 64, D)
        reuse = net.reuse(coarse.features)  # (B, 16, D)
    k = 8
    top = coarse.attention.topk(k, dim=1).indices
    assert [set(r.tolist()) for r in informative] == [set(r.tolist()) for r in top]
    assert [set(r.tolist()) for r in rest] == [set(range(16)) - set(r.tolist()) for r in top]
    tokens = seen[-1]  # (B, 1 + 4k + (16 - k), D)
    assert tokens.shape[1] == 1 + 4 * k + (16 - k)
    torch.testing.assert_close(tokens[:, 0], (net.vit.cls_token + net.vit.pos_embed[:, 0]).expand(2, -1, -1)[:, 0])
    for b in range(2):
        for j, region in enumerate(informative[b].tolist()):
            row, col = divmod(region, 4)
            fine_index = [(2 * row + a) * 8 + 2 * col + c for a in (0, 1) for c in (0, 1)]
            expected = full[b, fine_index] + reuse[b, region]  # nearest ×2: one R per region
            torch.testing.assert_close(tokens[b, 1 + 4 * j:1 + 4 * (j + 1)], expected)
        # uninformative regions keep their coarse embedding (+ coarse position embedding), no reuse
        torch.testing.assert_close(tokens[b, 1 + 4 * k:], coarse.embedding[b, rest[b]])


def test_split_all_resplits_every_patch() -> None:
    net = tiny_net(grid=4)
    net.train_split_all = True
    seen = block_inputs(net)
    with torch.no_grad():
        net.forward_train(torch.randn(2, 3, 32, 32))
    assert [t.shape[1] for t in seen] == [17, 65]


# ----------------------------------------------------------------------------- early exit


def test_batched_early_exit_equals_per_image_loop() -> None:
    net = tiny_net(grid=4)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        coarse_logits, fine_logits = net.forward_exits(x)
        confidence = coarse_logits.softmax(-1).amax(-1)
        ordered = confidence.sort().values
        eta = float(ordered[3] + ordered[4]) / 2  # no image sits on the threshold
        batched = net.forward_adaptive(x, [eta])
        single = [net.forward_adaptive(x[i:i + 1], [eta]) for i in range(8)]
    stops = confidence >= eta
    assert 0 < int(stops.sum()) < 8
    assert batched.exit_index.tolist() == (~stops).long().tolist()
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]), rtol=1e-5, atol=1e-5)
    assert batched.exit_index.tolist() == [int(s.exit_index) for s in single]
    torch.testing.assert_close(batched.gflops, torch.cat([s.gflops for s in single]))
    torch.testing.assert_close(batched.logits, torch.where(stops[:, None], coarse_logits, fine_logits),
                               rtol=1e-5, atol=1e-5)
    costs = torch.tensor(net.exit_gflops())
    torch.testing.assert_close(batched.gflops, costs[(~stops).long()])


def test_threshold_zero_and_above_one() -> None:
    net = tiny_net(grid=4)
    x = torch.randn(4, 3, 32, 32)
    seen = block_inputs(net)
    with torch.no_grad():
        coarse_logits, fine_logits = net.forward_exits(x)
        seen.clear()
        all_coarse = net.forward_adaptive(x, [0.0])
        assert len(seen) == 1  # the fine stage did not run at all
        all_fine = net.forward_adaptive(x, [1.01])
    assert all_coarse.exit_index.tolist() == [0] * 4
    torch.testing.assert_close(all_coarse.logits, coarse_logits)
    assert all_fine.exit_index.tolist() == [1] * 4
    torch.testing.assert_close(all_fine.logits, fine_logits, rtol=1e-5, atol=1e-5)
    assert all_fine.gflops.tolist() == pytest.approx([net.exit_gflops()[1]] * 4)


# ----------------------------------------------------------------------------- training


def tiny_module(**kwargs) -> CFViTLitModule:
    torch.manual_seed(0)
    return CFViTLitModule(backbone=BackboneSpec("vit_tiny_patch16_224", img_size=32, patch_size=4, kwargs=TINY), coarse_grid=4,
                          cls_attn_start=0, num_classes=3, **kwargs)


@pytest.mark.parametrize("soft", [False, True])
def test_kl_term_sends_no_gradient_into_fine_logits(soft: bool) -> None:
    module = tiny_module()
    coarse = torch.randn(4, 3, requires_grad=True)
    fine = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 1])
    if soft:
        target = F.one_hot(target, 3).float() * 0.9 + 0.1 / 3
    loss, logs = module.compute_loss(TrainOutput(coarse, fine, coarse, fine, None), target)
    loss.backward()
    ce_only = torch.autograd.grad(module.criterion(fine, target), fine)[0]
    torch.testing.assert_close(fine.grad, ce_only)
    expected_kl = F.kl_div(coarse.log_softmax(-1), fine.softmax(-1), reduction="sum") / 4
    torch.testing.assert_close(logs["loss_kl"], expected_kl.detach())
    assert coarse.grad.abs().sum() > 0


@pytest.mark.parametrize("weight", [0.0, 0.25])
def test_kl_weight_scales_the_coarse_gradient(weight: float) -> None:
    coarse = torch.randn(4, 3, requires_grad=True)
    fine = torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 1])
    tiny_module().compute_loss(TrainOutput(coarse, fine, coarse, fine, None), target)[0].backward()
    full = coarse.grad.clone()
    coarse.grad = None
    loss, logs = tiny_module(kl_weight=weight).compute_loss(TrainOutput(coarse, fine, coarse, fine, None), target)
    loss.backward()
    torch.testing.assert_close(coarse.grad, weight * full)
    torch.testing.assert_close(loss, logs["loss_ce"] + weight * logs["loss_kl"])


def test_negative_kl_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="kl_weight"):
        tiny_module(kl_weight=-1.0)


@pytest.mark.parametrize("split_all", [True, False])
def test_every_parameter_gets_a_gradient(split_all: bool) -> None:
    """DDP needs every parameter in the training forward (incl. the fine position embedding)."""
    module = tiny_module()
    module.net.train_split_all = split_all
    loss, _ = module.compute_loss(module.net.forward_train(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert [n for n, p in module.net.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_selection_switches_at_the_configured_epoch(image_folder: Path) -> None:
    module = tiny_module(selection_epoch=2, warmup_epochs=0)
    seen = block_inputs(module.net)
    per_epoch: list[set[int]] = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            per_epoch.append({t.shape[1] for t in seen})
            seen.clear()

    data = ImageDataModule("folder", root=str(image_folder), img_size=32, batch_size=4, num_workers=0,
                           auto_augment=None, reprob=0.0, pin_memory=False, persistent_workers=False)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=0, accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    # coarse 1+16 tokens; fine: 1+64 (every patch re-split) before epoch 2, then 1+4·8+8
    assert per_epoch == [{17, 65}, {17, 65}, {17, 41}]


# ----------------------------------------------------------------------------- the authors' checkpoints


def authors_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Random tensors in the authors' layout: LayerNorm weights near 1, the rest small."""
    torch.manual_seed(0)
    return {
        name: 1 + 0.1 * torch.randn(shape) if name.endswith("weight") and len(shape) == 1
        else 0.02 * torch.randn(shape)
        for name, shape in shapes.items()
    }


def authors_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, start: int, grid: int = 7,
                    alpha: float = 0.5, beta: float = 0.99, heads: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Their `cf_deit_small` (informative selection on), written independently from their
    description: whole attention maps in the EMA, their fine-token order, reuse upsampled by
    nearest ×2 over the whole grid before picking the informative regions."""
    def ln(t, p):  # noqa: ANN001, ANN202
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def lin(t, p):  # noqa: ANN001, ANN202
        return F.linear(t, sd[p + ".weight"], sd[p + ".bias"])

    def block(t, i):  # noqa: ANN001, ANN202
        p, (B, N, D) = f"blocks.{i}.", t.shape
        q, k, v = lin(ln(t, p + "norm1"), p + "attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1)
        t = t + lin((attn @ v).transpose(1, 2).reshape(B, N, D), p + "attn.proj")
        return t + lin(F.gelu(lin(ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2"), attn

    def embed(img):  # noqa: ANN001, ANN202
        return F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)

    def pick(t, index):  # noqa: ANN001, ANN202
        return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))

    B, depth, fine_grid = x.shape[0], 12, 2 * grid
    cls = sd["cls_token"].expand(B, -1, -1)
    small = F.interpolate(x, size=(16 * grid, 16 * grid), mode="bilinear", align_corners=True)
    embedding_1 = torch.cat([cls, embed(small)], 1) + sd["pos_embed_list.0"]
    t, attention = embedding_1, 0
    for i in range(depth):
        t, attn = block(t, i)
        if i >= start:
            attention = beta * attention + (1 - beta) * attn
    t = ln(t, "norm")
    coarse = lin(t[:, 0], "head")
    reuse = lin(F.gelu(lin(ln(t[:, 1:], "reuse_block.0"), "reuse_block.1.fc1")), "reuse_block.1.fc2")
    D = reuse.shape[-1]
    reuse = F.interpolate(reuse.transpose(1, 2).reshape(B, D, grid, grid), size=(fine_grid, fine_grid), mode="nearest")
    reuse = torch.cat([torch.zeros(B, 1, D), reuse.flatten(2).transpose(1, 2)], 1)
    embedding_2 = torch.cat([cls, embed(x)], 1) + reuse + sd["pos_embed_list.1"]
    order = attention.mean(1)[:, 0, 1:].argsort(1, descending=True)
    k = math.ceil(alpha * grid * grid)
    top_left = 4 * order[:, :k] - 2 * (order[:, :k] % grid)
    fine_index = torch.cat([top_left, top_left + 1, top_left + fine_grid, top_left + fine_grid + 1], 1)
    t = torch.cat([embedding_2[:, :1], pick(embedding_2, fine_index + 1), pick(embedding_1, order[:, k:] + 1)], 1)
    for i in range(depth):
        t, _ = block(t, i)
    return coarse, lin(ln(t, "norm")[:, 0], "head")


@pytest.fixture(scope="module")
def authors_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[CFViTLitModule, dict[str, torch.Tensor]]:
    """A DeiT-S CF-ViT loaded through `init_from` from random tensors saved in the authors' layout."""
    state = authors_state_dict(json.loads(AUTHORS_KEYS.read_text()))
    path = tmp_path_factory.mktemp("authors") / "cf_deit_small.pth"
    torch.save({"model": state, "flop": [1.1, 4.0]}, path)
    return CFViTLitModule(init_from=str(path), backbone=BackboneSpec(fused_attn=False)), state


def assert_every_tensor_lands(net: CFViT, state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the authors' `state` is in `net` unchanged, and `net` has no other."""
    ours = net.state_dict()
    landed = {authors_key(k): k for k in ours if k != "exit_thresholds"}
    assert set(landed) == set(state)  # every tensor lands, none is left unused
    for theirs, key in landed.items():
        assert torch.equal(ours[key], state[theirs]), key


def test_authors_checkpoint_every_tensor_lands_and_same_function(authors_model) -> None:  # noqa: ANN001
    module, state = authors_model
    assert_every_tensor_lands(module.net, state)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    module.net.eval()
    with torch.no_grad():
        coarse, fine = module.net.forward_exits(x)
        their_coarse, their_fine = authors_forward(state, x, start=3)
    torch.testing.assert_close(coarse, their_coarse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fine, their_fine, rtol=1e-4, atol=1e-4)


def test_authors_checkpoint_of_another_layout_is_a_clear_error(authors_model) -> None:  # noqa: ANN001
    module, state = authors_model
    broken = dict(state)
    del broken["reuse_block.1.fc2.bias"]
    broken["blocks.12.norm1.weight"] = torch.ones(384)
    with pytest.raises(ValueError, match=r"missing keys \['reuse_block.1.fc2.bias'\], unexpected keys \['blocks.12.norm1.weight'\]"):
        module.convert_foreign_checkpoint({"model": broken})
    nine = {**state, "pos_embed_list.0": torch.zeros(1, 82, 384), "pos_embed_list.1": torch.zeros(1, 325, 384)}
    with pytest.raises(ValueError, match=r"pos_embed_list.0 \[1, 82, 384\] vs \[1, 50, 384\].*coarse_grid: 9"):
        module.convert_foreign_checkpoint({"model": nine})
    # not their layout (e.g. a plain state_dict of this network): left to the caller
    assert module.convert_foreign_checkpoint({"model": module.net.state_dict()}) is None


def test_coarse_grid_and_img_size_must_agree() -> None:
    with pytest.raises(ValueError, match="set backbone.img_size to 2·coarse_grid·patch_size"):
        CFViTLitModule(backbone=BackboneSpec("vit_tiny_patch16_224", img_size=48, patch_size=4, kwargs=TINY), coarse_grid=4,
                       cls_attn_start=0)
    assert CFViTLitModule(coarse_grid=9, backbone=BackboneSpec(kwargs=dict(depth=4))).net.input_size() == (3, 288, 288)


# ----------------------------------------------------------------------------- CLI end to end


def test_fit_then_test_on_demo_data_with_thresholds_by_hand(run_cli) -> None:  # noqa: ANN001
    config = str(REPO / "configs/demo/cfvit.yaml")
    tiny = ["--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}",
            "--model.init_args.selection_epoch", "0"]
    costs = CFViTLitModule(backbone=BackboneSpec("vit_tiny_patch16_224", img_size=32, patch_size=4, kwargs=TINY), coarse_grid=4,
                           cls_attn_start=0, num_classes=10).net.exit_gflops()

    def check(cli, coarse_fraction: float, gflops: float) -> None:  # noqa: ANN001
        metrics = cli.trainer.callback_metrics
        assert float(metrics["test/exit_coarse/fraction"]) == pytest.approx(coarse_fraction)
        assert float(metrics["test/gflops"]) == pytest.approx(gflops, rel=1e-5)
        assert 0.0 <= float(metrics["test/top1"]) <= 1.0

    # η = 0 given by hand at fit: everything answers at the coarse stage
    run_cli("fit", "--config", config, *FAST_TRAINER, *tiny, "--model.init_args.thresholds", "[0.0]")
    ckpt = Path("runs/demo_cfvit/version_0/checkpoints/last.ckpt")
    check(run_cli("test", "--config", config, *FAST_TRAINER, *tiny, "--ckpt_path", str(ckpt)), 1.0, costs[0])
    # η = inf given by hand at test: everything goes on to the fine stage
    cli = run_cli("test", "--config", config, *FAST_TRAINER, *tiny, "--ckpt_path", str(ckpt),
                  "--model.init_args.thresholds", "[.inf]")
    check(cli, 0.0, costs[1])


def test_input_of_another_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"configured for \(3, 32, 32\) images, got \(3, 48, 48\)"):
        tiny_net(grid=4).forward_exits(torch.randn(1, 3, 48, 48))


def test_authors_checkpoint_validate_calibrates_then_test(run_cli, tmp_path: Path) -> None:  # noqa: ANN001
    """A user's path with the authors' file: `validate` with init_from calibrates η and saves
    calibrated.ckpt, which `test` then evaluates (a tiny network saved in their key layout)."""
    net = CFViTLitModule(backbone=BackboneSpec("vit_tiny_patch16_224", img_size=32, patch_size=4, kwargs=TINY), coarse_grid=4,
                         cls_attn_start=0, num_classes=10).net
    theirs = {authors_key(k): v for k, v in net.state_dict().items() if k != "exit_thresholds"}
    torch.save({"model": theirs, "flop": net.exit_gflops()}, tmp_path / "theirs.pth")
    common = ["--config", str(REPO / "configs/demo/cfvit.yaml"), *FAST_TRAINER,
              "--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}",
              "--model.init_args.cls_attn_start", "0", "--model.init_args.init_from", str(tmp_path / "theirs.pth"),
              "--trainer.callbacks", "[{class_path: ThresholdCalibration, init_args: {budget_fractions: [0.6]}}]"]
    run_cli("validate", *common)
    calibrated = Path("runs/demo_cfvit/version_0/calibrated.ckpt")
    assert calibrated.is_file()
    cli = run_cli("test", *common, "--ckpt_path", str(calibrated))
    assert "fraction_0.6" in cli.model.exit_policy.calibrations
    assert cli.model.net.exit_thresholds.tolist() == pytest.approx(cli.model.exit_policy.calibrations["fraction_0.6"]["thresholds"])
    assert net.exit_gflops()[0] <= float(cli.trainer.callback_metrics["test/gflops"]) <= net.exit_gflops()[1]
