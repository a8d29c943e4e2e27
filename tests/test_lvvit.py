"""LV-ViT: the backbone family (static LV-ViT-S), CF-ViT over it, its costs, the authors' checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from adaptive_vit.backbones import BackboneSpec, TrainHeads, build_backbone, family_of
from adaptive_vit.backbones.lvvit import LVBlock, LVViT
from adaptive_vit.data import ImageDataModule
from adaptive_vit.data.images import UnreadableImageWarning
from adaptive_vit.data.token_labels import TokenLabeler, dense_targets
from adaptive_vit.flops import fvcore_gflops
from adaptive_vit.methods.cfvit.lit import CFViTLitModule
from adaptive_vit.methods.cfvit.model import CFViT
from adaptive_vit.methods.static import StaticViTLitModule
from conftest import FAST_TRAINER, REPO
from test_cfvit import assert_every_tensor_lands, fvcore_stage_gflops, tiny_net
from test_resume import CALIBRATE, TINY, assert_same_run, final_state, interrupted

AUTHORS_KEYS = REPO / "tests/reference/cfvit_lvvit_small_7x7_authors_keys.json"


def tiny_lvvit(img_size: int = 32, depth: int = 2) -> LVViT:
    """A tiny LV-ViT on (3, img, img) images with 4-pixel patches (stem: stride 2, then 2×2),
    BatchNorms away from the identity (the backbone of `tiny_net`)."""
    net = tiny_net(grid=img_size // 8, depth=depth, backbone="lvvit_s")
    return net.vit


# ----------------------------------------------------------------------------- the backbone


def test_lvvit_s_shape_params_and_flops() -> None:
    model, family = build_backbone(BackboneSpec("lvvit_s"), 1000)
    stem = model.patch_embed
    assert [(c.kernel_size, c.stride, c.padding, c.bias) for c in (stem.conv1, stem.conv2, stem.conv3)] == [
        ((7, 7), (2, 2), (3, 3), None), ((3, 3), (1, 1), (1, 1), None), ((3, 3), (1, 1), (1, 1), None)]
    assert (stem.proj.kernel_size, stem.proj.stride, stem.proj.out_channels) == ((8, 8), (8, 8), 384)
    block = model.blocks[0]
    assert (len(model.blocks), block.attn.num_heads, block.mlp.fc1.out_features) == (16, 6, 1152)
    assert block.attn.qkv.bias is None and block.norm1.eps == model.norm.eps == 1e-5
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(26.15, abs=0.01)
    gflops = family.gflops(model)
    assert gflops == pytest.approx(6.6, rel=0.02)  # the paper (CF-ViT Table 2; LV-ViT)
    assert gflops == pytest.approx(6.5688, abs=1e-4)
    assert gflops == pytest.approx(fvcore_gflops(model, torch.randn(1, 3, 224, 224)), rel=1e-9)


def test_pretrained_file_in_the_tokenlabeling_layout_loads(tmp_path: Path) -> None:
    model = tiny_lvvit()
    path = tmp_path / "lvvit.pth.tar"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    spec = BackboneSpec("lvvit_s", img_size=32, patch_size=4, pretrained=str(path),
                        kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "stem_width": 8})
    loaded, _ = build_backbone(spec, 10)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="no download"):
        build_backbone(BackboneSpec("lvvit_s", pretrained=True), 10)


def test_tiny_lvvit_flops_equal_fvcore() -> None:
    model = tiny_lvvit(img_size=40, depth=3)
    family = family_of(model)
    assert family.gflops(model) == pytest.approx(fvcore_gflops(model, torch.randn(1, 3, 40, 40)), rel=1e-9)


def test_block_divides_both_residual_branches_by_skip_lam() -> None:
    torch.manual_seed(0)
    block = LVBlock(16, 2, mlp_ratio=3.0, qkv_bias=False, norm_layer=torch.nn.LayerNorm, skip_lam=2.0).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = x + block.attn(block.norm1(x)) / 2
        expected = y + block.mlp(block.norm2(y)) / 2
        got, cls_row = block(x, tap="cls")
        torch.testing.assert_close(block(x), expected)
    torch.testing.assert_close(got, expected)
    assert cls_row.shape == (2, 2, 4)


def test_static_prediction_is_cls_plus_half_the_token_heads_max() -> None:
    model = tiny_lvvit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = model.head(tokens[:, 0]) + 0.5 * model.aux_head(tokens[:, 1:]).amax(1)
        torch.testing.assert_close(model(x), expected)


def test_region_tokens_equal_the_full_images_tokens() -> None:
    """The stem's 7×7 and 3×3 convolutions cross region borders: the re-split tokens must be
    the full image's, not those of a crop with its own zero padding."""
    model = tiny_lvvit()
    family = family_of(model)
    x = torch.randn(2, 3, 32, 32)
    regions = torch.tensor([[0, 5, 15], [10, 3, 6]])  # corners, borders, interior of a 4×4 grid
    with torch.no_grad():
        full = model.tokenize(x).view(2, 8, 8, -1)  # fine 8×8 grid
        got = family.tokenize_regions(model, x, 4, regions)  # (B, k, 4, D)
    for b in range(2):
        for j, region in enumerate(regions[b].tolist()):
            row, col = divmod(region, 4)
            expected = full[b, 2 * row:2 * row + 2, 2 * col:2 * col + 2].reshape(4, -1)
            torch.testing.assert_close(got[b, j], expected)


# ----------------------------------------------------------------------------- CF-ViT over LV-ViT


def tiny_cfvit() -> CFViT:
    """CF-ViT over a tiny LV-ViT: 4×4 coarse, 8×8 fine tokens on 32×32 images."""
    return tiny_net(grid=4, backbone="lvvit_s")


def test_cfvit_lvvit_s_costs_against_the_paper() -> None:
    model, _ = build_backbone(BackboneSpec("lvvit_s", img_size=224), 1000)
    net = CFViT(model)
    coarse, fine = net.exit_gflops()
    assert (net.num_coarse, net.num_fine) == (49, 124)
    assert fine == pytest.approx(6.1, rel=0.02)  # paper Table 2: η = 1 (every image at the fine stage)
    assert (coarse, fine) == pytest.approx((1.5719, 5.9960), abs=1e-4)
    assert net.static_gflops() == pytest.approx(6.5688, abs=1e-4)
    assert [coarse, fine] == pytest.approx(fvcore_stage_gflops(net, torch.randn(1, 3, 224, 224)), rel=1e-9)


def test_stage_predictions_combine_both_heads_with_the_authors_weights() -> None:
    net = tiny_cfvit()
    x = torch.randn(3, 3, 32, 32)
    outputs: list[torch.Tensor] = []
    net.vit.norm.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        coarse, fine = net.forward_exits(x)
    heads = [(net.vit.head(t[:, 0]), net.vit.aux_head(t[:, 1:]).amax(1)) for t in outputs]
    torch.testing.assert_close(coarse, (heads[0][0] + 0.25 * heads[0][1]) / 1.25)
    torch.testing.assert_close(fine, heads[1][0] + 0.25 * heads[1][1])


def test_every_parameter_gets_a_gradient() -> None:
    """DDP needs every parameter in the training forward (the token head and the BatchNorms too)."""
    net = tiny_cfvit().train()
    out = net.forward_train(torch.randn(4, 3, 32, 32))
    (out.fine.logsumexp(-1) + out.coarse.logsumexp(-1)).sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_batched_early_exit_equals_the_exits() -> None:
    net = tiny_cfvit()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        coarse, fine = net.forward_exits(x)
        confidence = coarse.softmax(-1).amax(-1)
        ordered = confidence.sort().values
        eta = float(ordered[3] + ordered[4]) / 2
        out = net.forward_adaptive(x, [eta])
    stops = confidence >= eta
    torch.testing.assert_close(out.logits, torch.where(stops[:, None], coarse, fine), rtol=1e-5, atol=1e-5)
    assert out.exit_index.tolist() == (~stops).long().tolist()


# ----------------------------------------------------------------------------- the authors' checkpoints


def authors_state(grid: int) -> dict[str, torch.Tensor]:
    """Random tensors in the layout of their `cf_lvvit_small` (7×7 read off their model; 9×9
    differs only in the two position embeddings), BatchNorm statistics plausible."""
    shapes = json.loads(AUTHORS_KEYS.read_text())
    shapes["pos_embed_list.0"] = [1, 1 + grid ** 2, 384]
    shapes["pos_embed_list.1"] = [1, 1 + 4 * grid ** 2, 384]
    torch.manual_seed(0)

    def tensor(name: str, shape: list[int]) -> torch.Tensor:
        if name.endswith("num_batches_tracked"):
            return torch.tensor(1000)
        if name.endswith("running_var"):
            return torch.rand(shape) + 0.5
        if name.endswith("weight") and len(shape) == 1:
            return 1 + 0.1 * torch.randn(shape)
        if len(shape) == 4:  # convolutions: keep the stem's signal alive
            return torch.randn(shape) / math.sqrt(math.prod(shape[1:]))
        return 0.02 * torch.randn(shape)

    return {name: tensor(name, shape) for name, shape in shapes.items()}


class AuthorsCFLVViT:
    """Their `cf_lvvit_small` in eval mode with informative selection on (`forward`) and their
    `forward_early_exit`, written independently from their description: the whole stem, its
    projection included, on the full image; the reuse term nearest-upsampled over the whole
    fine grid; whole attention maps in the EMA from block 3; their token order; heads
    (cls + 0.25·max)/1.25 coarse and cls + 0.25·max fine."""

    def __init__(self, sd: dict[str, torch.Tensor], grid: int) -> None:
        self.sd, self.grid = sd, grid

    def ln(self, t: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], self.sd[p + ".weight"], self.sd[p + ".bias"], eps=1e-5)

    def lin(self, t: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(t, self.sd[p + ".weight"], self.sd.get(p + ".bias"))

    def conv_bn_relu(self, t: torch.Tensor, i: int, **conv) -> torch.Tensor:  # noqa: ANN003
        p = f"patch_embed.bn{i}."
        t = F.conv2d(t, self.sd[f"patch_embed.conv{i}.weight"], **conv)
        t = F.batch_norm(t, self.sd[p + "running_mean"], self.sd[p + "running_var"], self.sd[p + "weight"],
                         self.sd[p + "bias"], training=False, eps=1e-5)
        return F.relu(t)

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        t = self.conv_bn_relu(img, 1, stride=2, padding=3)
        t = self.conv_bn_relu(self.conv_bn_relu(t, 2, padding=1), 3, padding=1)
        t = F.conv2d(t, self.sd["patch_embed.proj.weight"], self.sd["patch_embed.proj.bias"], stride=8)
        return t.flatten(2).transpose(1, 2)

    def blocks(self, t: torch.Tensor, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attention = torch.zeros(())
        for i in range(16):
            p, (B, N, D) = f"blocks.{i}.", t.shape
            qkv = F.linear(self.ln(t, p + "norm1"), self.sd[p + "attn.qkv.weight"])  # no bias
            q, k, v = qkv.reshape(B, N, 3, 6, D // 6).permute(2, 0, 3, 1, 4)
            attn = ((q * (D // 6) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            t = t + self.lin((attn @ v).transpose(1, 2).reshape(B, N, D), p + "attn.proj") / 2
            t = t + self.lin(F.gelu(self.lin(self.ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2") / 2
            if start is not None and i >= start:
                attention = 0.99 * attention + 0.01 * attn
        return self.ln(t, "norm"), attention

    def heads(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(t[:, 0], "head"), self.lin(t[:, 1:], "aux_head").max(1)[0]

    def coarse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        small = F.interpolate(x, size=(16 * self.grid,) * 2, mode="bilinear", align_corners=True)
        cls = self.sd["cls_token"].expand(x.shape[0], -1, -1)
        embedding = torch.cat([cls, self.embed(small)], 1) + self.sd["pos_embed_list.0"]
        tokens, attention = self.blocks(embedding, start=3)
        head, aux = self.heads(tokens)
        return (head + 0.25 * aux) / 1.25, tokens, embedding, attention

    def fine(self, x: torch.Tensor, tokens: torch.Tensor, embedding_coarse: torch.Tensor,
             attention: torch.Tensor) -> torch.Tensor:
        B, g, fine_grid = x.shape[0], self.grid, 2 * self.grid
        reuse = self.lin(F.gelu(self.lin(self.ln(tokens[:, 1:], "reuse_block.0"), "reuse_block.1.fc1")),
                         "reuse_block.1.fc2")
        reuse = F.interpolate(reuse.transpose(1, 2).reshape(B, -1, g, g), size=(fine_grid,) * 2, mode="nearest")
        reuse = torch.cat([torch.zeros(B, 1, 384), reuse.flatten(2).transpose(1, 2)], 1)
        cls = self.sd["cls_token"].expand(B, -1, -1)
        embedding_fine = torch.cat([cls, self.embed(x)], 1) + reuse + self.sd["pos_embed_list.1"]
        order = attention.mean(1)[:, 0, 1:].argsort(1, descending=True)
        k = math.ceil(0.5 * g * g)
        top_left = 4 * order[:, :k] - 2 * (order[:, :k] % g)
        fine_index = torch.cat([top_left, top_left + 1, top_left + fine_grid, top_left + fine_grid + 1], 1)

        def pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))

        t = torch.cat([embedding_fine[:, :1], pick(embedding_fine, fine_index + 1),
                       pick(embedding_coarse, order[:, k:] + 1)], 1)
        head, aux = self.heads(self.blocks(t)[0])
        return head + 0.25 * aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coarse, tokens, embedding, attention = self.coarse(x)
        return coarse, self.fine(x, tokens, embedding, attention)

    def forward_early_exit(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        coarse, tokens, embedding, attention = self.coarse(x)
        go_on = coarse.softmax(1).max(1)[0] < threshold
        result = coarse.clone()
        result[go_on] = self.fine(x[go_on], tokens[go_on], embedding[go_on], attention[go_on])
        return result


@pytest.mark.parametrize("grid", [7, 9])
def test_authors_checkpoint_every_tensor_lands_and_same_function(grid: int, tmp_path: Path) -> None:
    state = authors_state(grid)
    path = tmp_path / f"cf_lvvit_small_{grid}x{grid}.pth"
    torch.save({"model": state, "flop": [1.6, 6.1]}, path)
    module = CFViTLitModule(init_from=str(path), coarse_grid=grid,
                            backbone=BackboneSpec("lvvit_s", fused_attn=False, drop_path_rate=0.0))
    assert_every_tensor_lands(module.net, state)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32 * grid, 32 * grid)
    theirs = AuthorsCFLVViT(state, grid)
    net = module.net.eval()
    with torch.no_grad():
        coarse, fine = net.forward_exits(x)
        their_coarse, their_fine = theirs.forward(x)
        torch.testing.assert_close(coarse, their_coarse, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fine, their_fine, rtol=1e-4, atol=1e-4)
        confidence = coarse.softmax(-1).amax(-1).sort().values
        eta = float(confidence[1] + confidence[2]) / 2  # two images answer at the coarse stage
        adaptive = net.forward_adaptive(x, [eta])
        torch.testing.assert_close(adaptive.logits, theirs.forward_early_exit(x, eta), rtol=1e-4, atol=1e-4)
    assert adaptive.exit_index.tolist().count(0) == 2


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(("config", "static", "exits"), [
    ("static_lvvit_s.yaml", 6.5688, [6.5688]),
    ("cfvit_lvvit_s.yaml", 6.5688, [1.5719, 5.9960]),
    ("cfvit_lvvit_s_9x9.yaml", 11.3525, [2.6145, 10.0854]),
])
def test_flops_of_the_configs(config: str, static: float, exits: list[float], tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "adaptive_vit", "flops", "--config", str(REPO / "configs" / config),
                          "--format", "json"], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    report = json.loads(out[out.index("{"):])
    assert report["static_gflops"] == pytest.approx(static, abs=1e-4)
    assert [e["cumulative_gflops"] for e in report["exits"]] == pytest.approx(exits, abs=1e-4)


# A tiny LV-ViT in place of a demo config's backbone (32×32 digits, 4-pixel patches: an 8×8 grid).
TINY_LVVIT = ["--model.init_args.backbone.name", "lvvit_s",
              "--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2, stem_width: 8}"]


def test_demo_size_cfvit_lvvit_fit_validate_test(run_cli) -> None:  # noqa: ANN001
    config = str(REPO / "configs/demo/cfvit.yaml")
    tiny = [*TINY_LVVIT, "--model.init_args.selection_epoch", "0", "--model.init_args.cls_attn_start", "0",
            "--model.init_args.thresholds", "[.inf]"]
    run_cli("fit", "--config", config, *FAST_TRAINER, *tiny)
    ckpt = Path("runs/demo_cfvit/version_0/checkpoints/last.ckpt")
    assert ckpt.is_file()
    for subcommand in ("validate", "test"):
        cli = run_cli(subcommand, "--config", config, *FAST_TRAINER, *tiny, "--ckpt_path", str(ckpt))
        assert isinstance(cli.model.net.vit, LVViT)
        costs = cli.model.net.exit_gflops()
        stage = "val" if subcommand == "validate" else "test"
        metrics = cli.trainer.callback_metrics
        assert float(metrics[f"{stage}/gflops"]) == pytest.approx(costs[1], rel=1e-5)
        assert 0.0 <= float(metrics[f"{stage}/top1"]) <= 1.0


# ----------------------------------------------------------------------------- token labeling


def write_label_maps(folder: Path, root: Path, k: int = 3, side: int = 5, classes: int = 3) -> Path:
    """Label maps in the TokenLabeling release's format for every training image under `folder`:
    <root>/<class>/<name>.pt, (2, k, side, side) top-k scores and class indices."""
    generator = torch.Generator().manual_seed(0)
    for image in sorted((folder / "train").glob("*/*.png")):
        scores = torch.rand(k, side, side, generator=generator).sort(0, descending=True).values * 10
        indices = torch.stack([torch.randperm(classes, generator=generator)[:k] for _ in range(side * side)], 1)
        path = root / image.parent.name / (image.stem + ".pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack([scores, indices.view(k, side, side).float()]), path)
    return root


def column_maps(batch: int, side: int, classes: int) -> torch.Tensor:
    """Label maps whose only class at column c is c (score 20): (B, 2, 1, side, side)."""
    scores = torch.full((batch, 1, 1, side, side), 20.0)
    indices = torch.arange(side).float().expand(batch, 1, 1, side, side)
    assert side <= classes
    return torch.cat([scores, indices], 1)


def test_dense_targets_follow_the_crop_and_the_flip() -> None:
    maps = column_maps(3, side=4, classes=6)
    boxes = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 0.5, 0]], dtype=torch.float32)
    targets = dense_targets(maps, boxes, grid=4, num_classes=6)  # (B, 1 + 16, 6)
    assert targets.shape == (3, 17, 6)
    torch.testing.assert_close(targets.sum(-1), torch.ones(3, 17))
    columns = targets[:, 1:].argmax(-1).view(3, 4, 4)
    assert columns[0].tolist() == [[0, 1, 2, 3]] * 4  # whole image
    assert columns[1].tolist() == [[3, 2, 1, 0]] * 4  # flipped with the image
    assert set(columns[2].flatten().tolist()) <= {0, 1}  # the left half only
    assert targets[0, 0, :4].allclose(torch.full((4,), 0.25), atol=0.02)  # class token: the whole box


def test_mix_token_swaps_one_box_of_images_and_targets() -> None:
    torch.manual_seed(3)
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 32, 32).clone()
    targets = torch.eye(4)[:, None].expand(4, 1 + 64, 4).clone()  # image i: class i everywhere
    mixed, mixed_targets = TokenLabeler(4, grid=8).mix(images, targets)
    swapped = mixed[:, 0] != images[:, 0]  # (B, 32, 32): pixels taken from the reversed batch
    cells = mixed_targets[:, 1:].argmax(-1).view(4, 8, 8) != torch.arange(4)[:, None, None]
    assert swapped.any()
    torch.testing.assert_close(swapped[:, ::4, ::4], cells)  # the same box, aligned to 4-pixel tokens
    torch.testing.assert_close(mixed[:, :, swapped[0]], images.flip(0)[:, :, swapped[0]])
    lam = 1 - cells[0].float().mean()
    torch.testing.assert_close(mixed_targets[:, 0], lam * targets[:, 0] + (1 - lam) * targets.flip(0)[:, 0])


def test_loader_crops_labels_with_the_image(image_folder: Path, tmp_path: Path) -> None:
    labels = write_label_maps(image_folder, tmp_path / "labels")
    data = ImageDataModule("folder", root=str(image_folder), img_size=32, batch_size=4, num_workers=0,
                           auto_augment=None, reprob=0.0, pin_memory=False, persistent_workers=False,
                           token_labels=str(labels), token_label_grid=8, label_smoothing=0.1)
    data.setup("fit")
    image, (label, label_map, box) = data._datasets["train"][(0, 7)]
    assert image.shape == (3, 32, 32) and label_map.shape == (2, 3, 5, 5)
    assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1 and box[4] in (0, 1)
    assert data.soft_targets
    (labels / "class_0" / "0.pt").write_bytes(b"not a tensor")  # the first training image's map
    with pytest.warns(UnreadableImageWarning, match="class_0/0.png or its label map"):
        assert data._datasets["train"]._wrapped[0] is None  # replaced by the next one in training
    with pytest.raises(ValueError, match="set mixup and cutmix to 0"):
        ImageDataModule("folder", root=str(image_folder), token_labels=str(labels), mixup=0.8)
    with pytest.raises(FileNotFoundError, match="no label map"):
        ImageDataModule("folder", root=str(image_folder), img_size=32, token_labels=str(tmp_path)).setup("fit")


def test_token_labeling_trains_cfvit_lvvit_end_to_end(image_folder: Path, tmp_path: Path) -> None:
    labels = write_label_maps(image_folder, tmp_path / "labels")
    data = ImageDataModule("folder", root=str(image_folder), img_size=32, batch_size=4, num_workers=0,
                           auto_augment=None, reprob=0.0, pin_memory=False, persistent_workers=False,
                           token_labels=str(labels), token_label_grid=8, label_smoothing=0.1)
    torch.manual_seed(0)
    module = CFViTLitModule(backbone=BackboneSpec("lvvit_s", img_size=32, patch_size=4, drop_path_rate=0.0,
                                                  kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "stem_width": 8}),
                            coarse_grid=4, cls_attn_start=0, num_classes=3, selection_epoch=1, warmup_epochs=0)
    seen: list[torch.Tensor] = []
    original = module.compute_loss

    def record(output, target):  # noqa: ANN001, ANN202
        loss, logs = original(output, target)
        seen.append(logs["loss_token"])
        return loss, logs

    module.compute_loss = record
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=data)  # epoch 0 re-splits every patch, epoch 1 selects
    assert len(seen) == 4 and all(torch.isfinite(t) and t > 0 for t in seen)


def test_token_loss_is_the_fine_token_heads_ce_on_the_fine_grid() -> None:
    module = CFViTLitModule(backbone=BackboneSpec("lvvit_s", img_size=32, patch_size=4, drop_path_rate=0.0,
                                                  kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "stem_width": 8}),
                            coarse_grid=4, cls_attn_start=0, num_classes=3)
    torch.manual_seed(0)
    out = module.net.train().forward_train(torch.randn(2, 3, 32, 32))
    assert out.fine_dense.shape == (2, 64, 3)
    target = torch.rand(2, 65, 3).softmax(-1)
    loss, logs = module.compute_loss(out, target)
    token = -(target[:, 1:] * out.fine_dense.log_softmax(-1)).sum(-1).mean()
    cls = -(target[:, 0] * out.fine_class.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(logs["loss_token"], token.detach())
    torch.testing.assert_close(logs["loss_ce"], (cls + token).detach())
    with pytest.raises(ValueError, match="token_label_grid to 8"):
        module.compute_loss(out, target[:, :50])


def test_token_labeling_trains_static_lvvit_fit_then_test(run_cli, image_folder: Path, tmp_path: Path) -> None:  # noqa: ANN001
    labels = write_label_maps(image_folder, tmp_path / "labels")
    args = ["--config", str(REPO / "configs/demo/static.yaml"), *FAST_TRAINER, *TINY_LVVIT,
            "--data.init_args.dataset", "folder", "--data.init_args.root", str(image_folder),
            "--data.init_args.auto_augment", "null", "--data.init_args.label_smoothing", "0.1",
            "--data.init_args.batch_size", "8",  # 3 batches of the 24 training images
            "--data.init_args.token_labels", str(labels), "--data.init_args.token_label_grid", "8"]
    fit = run_cli("fit", *args)
    logged = fit.trainer.callback_metrics
    assert all(torch.isfinite(logged[k]) and logged[k] > 0 for k in ("train/loss_cls", "train/loss_token"))
    torch.testing.assert_close(logged["train/loss"], logged["train/loss_cls"] + logged["train/loss_token"])
    ckpt = tmp_path / "runs/demo_static/version_0/checkpoints/last.ckpt"
    test = run_cli("test", *args, "--ckpt_path", str(ckpt))
    assert isinstance(test.model.net.backbone, LVViT) and 0.0 <= float(test.trainer.callback_metrics["test/top1"]) <= 1.0


def test_static_token_labeling_loss_by_hand() -> None:
    """One image, two classes, two tokens: cls ln 2; tokens ½·ln(16/3) and ln 2; weight ½."""
    module = StaticViTLitModule(backbone=BackboneSpec("lvvit_s", img_size=8, patch_size=4, drop_path_rate=0.0,
                                                      kwargs={"embed_dim": 8, "depth": 1, "num_heads": 1,
                                                              "stem_width": 4}),
                                num_classes=2, token_loss_weight=0.5)
    class_logits = torch.tensor([[0.0, 0.0]])
    dense = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # (B, N, classes)
    target = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])  # class token, token 1, token 2
    loss, logs = module.compute_loss(TrainHeads(class_logits, class_logits, dense), target)
    token = (0.5 * math.log(16 / 3) + math.log(2)) / 2
    torch.testing.assert_close(logs["loss_cls"], torch.tensor(math.log(2)))
    torch.testing.assert_close(logs["loss_token"], torch.tensor(token))
    torch.testing.assert_close(loss, torch.tensor(math.log(2) + 0.5 * token))
    with pytest.raises(ValueError, match=r"token_label_grid to 1 \(img_size / patch_size\)"):
        module.compute_loss(TrainHeads(class_logits, class_logits, dense[:, :1]), target)
    with pytest.raises(ValueError, match="'vit_tiny_patch16_224' has none. Remove data.init_args.token_labels"):
        deit = StaticViTLitModule(backbone=BackboneSpec("vit_tiny_patch16_224", img_size=8, patch_size=4,
                                                        kwargs={"embed_dim": 8, "depth": 1, "num_heads": 1}),
                                  num_classes=2)
        deit.compute_loss(deit.net.forward_train(torch.randn(1, 3, 8, 8)), target)


# ----------------------------------------------------------------------------- model EMA


class RawWeights(pl.Callback):
    """Records one raw (not averaged) weight after every optimiser step."""

    def __init__(self, key: str = "net.vit.blocks.0.attn.qkv.weight") -> None:
        self.key, self.seen = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen.append(pl_module.state_dict()[self.key].detach().clone())


class StopInValidation(pl.Callback):
    """Ctrl+C in the middle of the first epoch's validation (after the sanity check)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        if not trainer.sanity_checking and trainer.current_epoch == 0:
            raise KeyboardInterrupt


def test_model_ema_is_validated_saved_and_resumed(run_cli, tmp_path: Path) -> None:  # noqa: ANN001
    """CF-ViT with calibrated thresholds and ModelEMA (decay ½): the checkpoint's state_dict is the
    average of the raw weights step by step, its current_model_state the raw ones, the thresholds the
    calibrated ones in both; stopped in validation (the average swapped in), or in training, the
    resumed run ends with the uninterrupted one's weights."""
    args = ["--config", str(REPO / "configs/demo/cfvit.yaml"), *TINY, "--trainer.max_epochs", "2", *CALIBRATE,
            "--model.init_args.selection_epoch", "1", "--trainer.callbacks+=ModelEMA",
            "--trainer.callbacks.decay=0.5"]
    cli = run_cli("fit", *args, "--trainer.callbacks+=test_lvvit.RawWeights")
    expected = final_state(cli)  # after fit, the module holds the average (as the best checkpoint does)
    raw = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RawWeights")
    average = raw.seen[0]  # Lightning's first update copies the weights
    for weights in raw.seen[1:]:
        average = 0.5 * average + 0.5 * weights
    saved = torch.load(tmp_path / "runs/demo_cfvit/version_0/checkpoints/last.ckpt", weights_only=True)
    torch.testing.assert_close(saved["state_dict"][raw.key], average)
    torch.testing.assert_close(saved["current_model_state"][raw.key], raw.seen[-1])
    assert not torch.allclose(average, raw.seen[-1])
    thresholds = cli.model.exit_policy.calibrations["fraction_0.7"]["thresholds"]
    for state in (saved["state_dict"], saved["current_model_state"], expected[0]):
        assert state["net.exit_thresholds"].tolist() == pytest.approx(thresholds)  # never averaged

    with pytest.raises(SystemExit):  # last.ckpt written while the average is swapped in
        run_cli("fit", *args, "--trainer.callbacks+=test_lvvit.StopInValidation")
    weights, _ = final_state(run_cli("fit", *args, "--ckpt_path", "last"))
    for key, value in expected[0].items():  # trained on from the raw weights, not from the average
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6, msg=key)
    # (its metrics differ: a fit resumed from inside a validation does not redo it, so that epoch's
    # calibration is missing; the same without EMA)
    interrupted(run_cli, args, 3, "interrupt")
    assert_same_run(expected, run_cli("fit", *args, "--ckpt_path", "last"))
