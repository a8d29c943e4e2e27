"""A backbone is one thing: a family written in one module and registered works with every
method, without touching the LightningModules; old flat configs get the new spelling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from adaptive_vit.backbones import Block, BackboneDims, BackboneFamily, BackboneSpec, register_family
from adaptive_vit.flops import block_flops, fvcore_gflops, norm_flops
from adaptive_vit.methods import CFViTLitModule, DVTLitModule, MIALitModule, StaticViTLitModule
from conftest import FAST_TRAINER, REPO


class ToyViT(nn.Module):
    """A small ViT of its own (not timm's class): a two-convolution stem, a cls token, learned
    positions, this project's tap-able blocks, a final norm and a linear head."""

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, heads: int, num_classes: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.stem = nn.Sequential(nn.Conv2d(3, dim // 2, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(dim // 2, dim, patch_size, stride=patch_size))
        grid = img_size // patch_size
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio=2.0) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return TOY.head(self, self.norm(self.blocks(TOY.embed(self, x))))


class ToyFamily(BackboneFamily):
    """Names ``toy_vit_<dim>``: a `ToyViT` of that width."""

    name = "toy_vit"
    model_class = ToyViT

    def handles(self, name: str) -> bool:
        return name.startswith("toy_vit_")

    def create(self, spec: BackboneSpec, num_classes: int) -> ToyViT:
        options = {"depth": 2, "heads": 2, **spec.kwargs}
        return ToyViT(spec.img_size or 32, spec.patch_size or 4, int(spec.name.rsplit("_", 1)[1]),
                      num_classes=num_classes, **options)

    def dims(self, model: ToyViT) -> BackboneDims:
        block = model.blocks[0]
        grid = model.img_size // model.patch_size
        return BackboneDims(dim=model.cls.shape[-1], depth=len(model.blocks), num_heads=block.attn.num_heads,
                            mlp_hidden=block.mlp.fc1.out_features, grid=(grid, grid), num_prefix_tokens=1,
                            patch_size=model.patch_size, in_chans=3, num_classes=model.head.out_features)

    def tokenize(self, model: ToyViT, x: Tensor) -> Tensor:
        return model.stem(x).flatten(2).transpose(1, 2)

    def cls_token(self, model: ToyViT) -> Tensor:
        return model.cls

    def pos_embed(self, model: ToyViT) -> Tensor:
        return model.pos

    def pre_blocks(self, model: ToyViT, tokens: Tensor) -> Tensor:
        return tokens  # no dropout layer; the other parts have the default names (blocks, norm, head)

    def gflops(self, model: ToyViT) -> float:
        d = self.dims(model)
        pixels = model.img_size ** 2
        stem = pixels * 3 * (d.dim // 2) * 9 + d.num_patches * (d.dim // 2) * d.patch_size ** 2 * d.dim
        tokens = 1 + d.num_patches
        blocks = d.depth * block_flops(tokens, d.dim, d.num_heads, d.mlp_hidden)
        return (stem + blocks + norm_flops(tokens, d.dim) + d.dim * d.num_classes) / 1e9


TOY = register_family(ToyFamily())
SPEC = BackboneSpec(name="toy_vit_32", img_size=32, patch_size=4, drop_path_rate=0.0)


@pytest.mark.parametrize("module", [
    lambda: StaticViTLitModule(backbone=SPEC, num_classes=5),
    lambda: CFViTLitModule(backbone=SPEC, coarse_grid=4, cls_attn_start=0, num_classes=5),
    lambda: DVTLitModule(backbone=SPEC, img_size=32, patch_sizes=[8, 4], paddings=[0, 0], reuse_hidden=16,
                         reuse_dim=8, num_classes=5),
    lambda: MIALitModule(backbone=SPEC, num_classes=5),
], ids=["static", "cfvit", "dvt", "mia"])
def test_a_registered_family_runs_every_method(module) -> None:  # noqa: ANN001
    lit = module().eval()
    net = lit.net
    x = torch.randn(3, 3, 32, 32)
    out = net.forward_adaptive(x, [0.5] * (net.num_exits - 1))
    assert out.logits.shape == (3, 5) and torch.isfinite(out.logits).all()
    assert net.static_gflops() == pytest.approx(fvcore_gflops(net.static_baseline(), x), rel=1e-6)
    assert 0 < float(out.gflops.min()) and float(out.gflops.max()) <= net.exit_gflops()[-1] * (1 + 1e-6)


def test_a_registered_family_fits_and_tests_from_the_cli(run_cli, tmp_path: Path) -> None:
    toy = ["--model.init_args.backbone.name", "toy_vit_32", "--model.init_args.backbone.kwargs", "{depth: 1}",
           "--model.init_args.backbone.img_size", "32", "--model.init_args.backbone.patch_size", "4"]
    run_cli("fit", "--config", str(REPO / "configs/demo/static.yaml"), *toy, *FAST_TRAINER)
    ckpt = tmp_path / "runs/demo_static/version_0/checkpoints/last.ckpt"
    cli = run_cli("test", "--config", str(REPO / "configs/demo/static.yaml"), *toy, *FAST_TRAINER,
                  "--ckpt_path", str(ckpt))
    assert isinstance(cli.model.net.backbone, ToyViT)
    assert float(cli.trainer.callback_metrics["test/gflops"]) == pytest.approx(cli.model.net.static_gflops(), rel=1e-5)


def test_unknown_backbone_names_the_families() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'deit_smal'.*Did you mean"):
        StaticViTLitModule(backbone=BackboneSpec(name="deit_smal"))


def test_old_flat_config_gets_the_new_spelling(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"  # DVT keeps img_size as its own argument: not reported
    path.write_text("model:\n  class_path: DVTLitModule\n  init_args:\n    backbone: vit_tiny_patch16_224\n"
                    "    img_size: 32\n    vit_kwargs: {embed_dim: 32}\n    drop_path_rate: 0.0\n")
    with pytest.raises(ValueError, match=(
            r"old.yaml: the backbone arguments are one group now\. Replace model.init_args.backbone, "
            r"model.init_args.vit_kwargs, model.init_args.drop_path_rate with\n    backbone:\n"
            r"      name: \"vit_tiny_patch16_224\"\n      kwargs: \{\"embed_dim\": 32\}\n      drop_path_rate: 0.0\n")):
        run_cli("fit", "--config", str(path))
