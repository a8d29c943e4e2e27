"""Backbones (timm blocks with taps, offline weights, errors) and the FLOPs convention."""

from __future__ import annotations

import pytest
import torch

from adaptive_vit.backbones import create_vit, set_fused_attn, vit_dims
from adaptive_vit.flops import block_flops, fvcore_gflops, vit_flops


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "reference"),
    [
        ("deit_tiny_patch16_224", {}, 224, 1.258),
        ("deit_small_patch16_224", {}, 224, 4.608),
        ("deit_base_patch16_224", {}, 224, 17.58),
        ("deit_small_patch16_224", {"img_size": 112}, 112, 1.102),
        ("deit_small_patch16_224", {"patch_size": 32}, 224, 1.145),
    ],
)
def test_reference_gflops(name: str, kwargs: dict, size: int, reference: float) -> None:
    """The reference figures (docs/methods.md, FLOPs convention), fvcore with the SDPA handle, both kernels, and the formula."""
    model = create_vit(name, **kwargs)
    x = torch.randn(1, 3, size, size)
    for fused in (True, False):
        set_fused_attn(model, fused)
        assert fvcore_gflops(model, x) == pytest.approx(reference, rel=5e-3)
    assert vit_flops(**vit_dims(model)) / 1e9 == pytest.approx(fvcore_gflops(model, x), rel=1e-6)


def test_analytic_block_equals_fvcore_on_odd_shapes() -> None:
    model = create_vit("vit_tiny_patch16_224", img_size=40, patch_size=8, embed_dim=48, depth=1,
                       num_heads=3, mlp_ratio=3.0, num_classes=7)
    block = model.blocks[0]
    tokens = torch.randn(2, 26, 48)
    expected = block_flops(26, 48, 3, 144) / 1e9
    assert fvcore_gflops(block, tokens) == pytest.approx(expected, rel=1e-9)


def _tiny(**kwargs):
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2,
                      num_heads=2, num_classes=5, **kwargs).eval()


def test_fused_and_explicit_paths_agree_and_taps() -> None:
    model = _tiny()
    block = model.blocks[0]
    x = torch.randn(3, 65, 32)
    bias = torch.randn(3, 2, 65, 65)
    out = {}
    for fused in (True, False):
        set_fused_attn(model, fused)
        out[fused] = (block(x, attn_mask=bias), block(x, attn_mask=bias, tap="cls"))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    # the cls row computed on the side (fused) == the row of the explicit attention map
    torch.testing.assert_close(out[True][1][1], out[False][1][1], rtol=1e-5, atol=1e-6)
    y, logits = block(x, attn_mask=bias, tap="logits")
    assert logits.shape == (3, 2, 65, 65)
    torch.testing.assert_close(y, out[True][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.softmax(-1)[:, :, 0, 1:], out[False][1][1])
    # the additive term really reaches the logits
    _, plain = block(x, tap="logits")
    torch.testing.assert_close(logits - plain, bias, rtol=1e-4, atol=1e-4)


def test_local_pretrained_file_loads_and_drops_other_head(tmp_path) -> None:
    source = _tiny()
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_vit("vit_tiny_patch16_224", pretrained=str(path), img_size=32, patch_size=4,
                        embed_dim=32, depth=2, num_heads=2, num_classes=5)
    torch.testing.assert_close(loaded.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(loaded.head.weight, source.head.weight)  # same classes: kept
    other = create_vit("vit_tiny_patch16_224", pretrained=str(path), img_size=32, patch_size=4,
                       embed_dim=32, depth=2, num_heads=2, num_classes=3)
    assert other.head.weight.shape == (3, 32)  # another class count: a fresh classifier
    torch.testing.assert_close(other.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_pretrained_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found.*missing.pth"):
        create_vit("deit_tiny_patch16_224", pretrained=str(tmp_path / "missing.pth"))
    path = tmp_path / "small.pth"
    torch.save(_tiny().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit 'deit_small_patch16_224'"):
        create_vit("deit_small_patch16_224", pretrained=str(path), num_classes=5)


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'deit_smal_patch16_224'.*deit_small_patch16_224"):
        create_vit("deit_smal_patch16_224")
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        create_vit("resnet18")
