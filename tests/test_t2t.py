"""T2T-ViT: the backbone family (grids, costs, the authors' function) and DVT over it (costs per
exit, the authors' checkpoints, the demo pipeline)."""

from __future__ import annotations

import math
import subprocess
import sys
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaptive_vit.backbones import BackboneSpec, build_backbone, family_of
from adaptive_vit.backbones.t2t_vit import T2TViT, sinusoid_table
from adaptive_vit.flops import fvcore_gflops
from conftest import REPO

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


def authors_t2t_vit(state: dict, x: torch.Tensor, soft_split: list[int], heads: int) -> torch.Tensor:
    z = authors_t2t_tokens(state, x, "", soft_split)
    b, n, d = z.shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        q, k, v = _lin(state, _ln(state, z, p + ".norm1"), p + ".attn.qkv").reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
        z = z + _lin(state, (a @ v).transpose(1, 2).reshape(b, n, d), p + ".attn.proj")
        z = z + _lin(state, F.gelu(_lin(state, _ln(state, z, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
    return _lin(state, _ln(state, z, "norm")[:, 0], "head")


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
    out = subprocess.run(
        [sys.executable, "-m", "adaptive_vit", "flops", "--config", str(REPO / f"configs/{config}.yaml"),
         "--format", "json"], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    report = json.loads(out[out.index("{"):])
    assert report["static_gflops"] == pytest.approx(gflops, rel=0.02)
    assert report["params_m"] == pytest.approx(params, rel=0.02)  # T2T-ViT paper, Table 1


def test_a_patch_size_gets_the_soft_split_spelling() -> None:
    with pytest.raises(ValueError, match=r"soft_split: \[kernel, stride, padding\]"):
        build_backbone(BackboneSpec(name="t2t_vit_12", patch_size=16), 10)
    with pytest.raises(ValueError, match="t2t_vit_12, t2t_vit_14|builds"):
        build_backbone(BackboneSpec(name="t2t_vit_13"), 10)
