"""DVT: resize, feature/relationship reuse wiring, switches, real early exit, costs, converter, CLI."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptive_vit.flops import fvcore_gflops, vit_flops
from adaptive_vit.backbones import BackboneSpec, set_fused_attn, vit_dims
from adaptive_vit.methods.dvt import kernel
from adaptive_vit.methods.dvt.convert import AUTHORS_EXITS, convert_authors_checkpoint
from adaptive_vit.methods.dvt.lit import DVTLitModule
from adaptive_vit.methods.dvt.model import DVT, Handoff, build_tokenized_vit, split_thresholds
from adaptive_vit.methods.dvt.resize import resize_grid, resize_keys, resize_queries, resize_relation, resize_taps
from adaptive_vit.methods.dvt.reuse import FeatureReuse, RelationReuse
from conftest import FAST_TRAINER, REPO

# The DVT authors' DeiT-S key layout (a copy of shared/reference/dvt_deit_small_authors_keys.json).
AUTHORS_KEYS = Path(__file__).parent / "reference" / "dvt_deit_small_authors_keys.json"
# 32x32 images: 4x4, 6x6 (6-pixel patches, padding 2) and 8x8 tokens; width 32, 2 blocks, 2 heads.
TINY = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_sizes=[8, 6, 4], paddings=[0, 2, 0],
            num_classes=10, embed_dim=32, depth=2, num_heads=2, reuse_hidden=16, reuse_dim=8)
DEIT_S = dict(num_classes=1000, weight_init="skip")  # costs only: skip timm's slow init


@pytest.fixture(scope="module")
def deit_s() -> DVT:
    return DVT.from_name(**DEIT_S)


def tiny_dvt(seed: int = 0, **overrides) -> DVT:
    torch.manual_seed(seed)
    return DVT.from_name(**{**TINY, **overrides}).eval()


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- resize


def test_resize_of_figure_5_on_a_2x2_grid() -> None:
    # nearest x2 -> 4x4, then adaptive average pooling to 3x3 (bins [0,2), [1,3), [2,4))
    grid = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    expected = torch.tensor([[1.0, 1.5, 2.0], [2.0, 2.5, 3.0], [3.0, 3.5, 4.0]])
    torch.testing.assert_close(resize_grid(grid, 3)[0, 0], expected)


@pytest.mark.parametrize("grid, size, upsampled", [(2, 3, None), (7, 10, None), (10, 14, None), (14, 7, None),
                                                   (7, 14, 20), (4, 8, 10)])
def test_matrix_resize_equals_interpolate_then_adaptive_pool(grid: int, size: int, upsampled: int | None) -> None:
    maps = torch.randn(2, 5, grid, grid)
    stretched = F.interpolate(maps, size=upsampled or 2 * grid, mode="nearest")  # the authors': (20, 20) into 14x14
    torch.testing.assert_close(resize_grid(maps, size, upsampled), F.adaptive_avg_pool2d(stretched, size))


def test_relation_resize_keys_then_queries_keeps_cls_apart() -> None:
    # (1 map, 1+4 queries, 1+4 keys) on a 2x2 grid -> 1+9 on a 3x3 grid
    logits = torch.arange(25.0).reshape(1, 1, 5, 5)
    out = resize_queries(resize_keys(logits, 2, 3), 2, 3)
    assert out.shape == (1, 1, 10, 10)
    assert out[0, 0, 0, 0] == logits[0, 0, 0, 0]  # cls->cls passes unchanged
    torch.testing.assert_close(out[0, 0, 0, 1:], resize_grid(logits[0, 0, 0, 1:].reshape(1, 1, 2, 2), 3).flatten())
    torch.testing.assert_close(out[0, 0, 1:, 0], resize_grid(logits[0, 0, 1:, 0].reshape(1, 1, 2, 2), 3).flatten())
    # patch/patch: resizing keys then queries = the separable 2-D resize of each axis pair
    patch = logits[0, 0, 1:, 1:].reshape(2, 2, 2, 2)  # (query row, query col, key row, key col)
    one_d = resize_grid(torch.eye(2).reshape(2, 1, 1, 2).expand(2, 1, 2, 2), 3)[:, 0, 0].T  # (3, 2)
    expected = torch.einsum("ai,bj,ijkl,ck,dl->abcd", one_d, one_d, patch, one_d, one_d)
    torch.testing.assert_close(out[0, 0, 1:, 1:], expected.reshape(9, 9))
    assert resize_keys(logits, 2, 3).shape == (1, 1, 5, 10)


@pytest.mark.parametrize("grid, size", [(2, 3), (4, 6), (7, 10), (10, 14), (5, 5)])
def test_compiled_relation_resize_equals_the_matmul_resize(grid: int, size: int) -> None:
    assert kernel.cpu_kernel() is not None, "the CPU resize kernel did not build: see the warning"
    n = 1 + grid * grid
    relation = torch.randn(3, 8, n, n)[:, 2:4]  # one layer's slice of a (B, H·L, n, n) stack
    expected = resize_queries(resize_keys(relation, grid, size), grid, size)
    torch.testing.assert_close(resize_relation(relation, grid, size), expected)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):  # computed in double / float, stored once
        stored = relation.to(dtype)
        exact = stored.to(torch.float64 if dtype == torch.float64 else torch.float32)
        out = resize_relation(stored, grid, size)
        assert out.dtype == dtype
        torch.testing.assert_close(out, resize_queries(resize_keys(exact, grid, size), grid, size).to(dtype))


def test_relation_resize_falls_back_to_the_matmuls_and_says_how_to_build(monkeypatch) -> None:
    import torch.utils.cpp_extension

    def no_ninja(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_ninja)
    with pytest.warns(UserWarning, match=r"Ninja is required.*pip install ninja.*ADAPTIVE_VIT_CPU_KERNEL=0"):
        assert kernel.cpu_kernel.__wrapped__() is None
    monkeypatch.setenv(kernel.SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.cpu_kernel.__wrapped__() is None  # switched off: not built, no warning
    monkeypatch.setattr(kernel, "cpu_kernel", lambda: None)
    relation = torch.randn(2, 2, 17, 17)
    torch.testing.assert_close(resize_relation(relation, 4, 6),
                               resize_queries(resize_keys(relation, 4, 6), 4, 6))


def test_resize_taps_reject_a_resize_with_more_than_two_inputs() -> None:
    taps, weights = resize_taps(2, 3)  # Figure 5: [x0, (x0+x1)/2, x1]
    assert taps.tolist() == [[0, 0], [0, 1], [1, 1]] and weights.tolist() == [[1, 0], [0.5, 0.5], [1, 0]]
    with pytest.raises(ValueError, match="at most two"):
        resize_taps(14, 5)


def test_relation_reuse_is_the_shared_mlp_then_the_resize_split_per_layer() -> None:
    torch.manual_seed(0)
    reuse = RelationReuse(num_heads=2, depth=3, upstream_grid=2, grid=3)
    logits = torch.randn(4, 6, 5, 5)
    expected = resize_queries(resize_keys(reuse.mlp(logits), 2, 3), 2, 3).split(2, dim=1)
    terms = list(reuse(logits))
    assert len(terms) == 3
    for term, reference in zip(terms, expected):
        torch.testing.assert_close(term, reference)


# ----------------------------------------------------------------------------- reuse wiring


def test_reused_features_come_before_the_upstream_norm_and_cls_is_zero() -> None:
    model = tiny_dvt()
    seen: dict[str, torch.Tensor] = {}
    model.exits[0].vit.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last_block", o[0]))  # (x, logits)
    reuse: FeatureReuse = model.exits[1].vit.blocks[0].feature_reuse
    reuse.register_forward_hook(lambda m, i, o: seen.update(reuse_in=i[0], reuse_out=o))
    with torch.no_grad():
        model.forward_exits(images())
    torch.testing.assert_close(seen["reuse_in"], seen["last_block"][:, 1:])  # patch tokens, pre-norm
    normed = model.exits[0].vit.norm(seen["last_block"])[:, 1:]
    assert not torch.allclose(seen["reuse_in"], normed)
    assert seen["reuse_out"].shape == (6, 1 + 36, 8)  # downstream 6x6 grid + cls, 8 reused channels
    assert torch.all(seen["reuse_out"][:, 0] == 0) and seen["reuse_out"][:, 1:].abs().sum() > 0


def test_relationship_reuse_adds_one_term_per_downstream_layer() -> None:
    model = tiny_dvt()
    calls: list[tuple[int, tuple | None, str | None]] = []
    for k, exit_ in enumerate(model.exits):
        for block in exit_.vit.blocks:
            block.attn.register_forward_pre_hook(
                lambda m, a, kw, k=k: calls.append(
                    (k, None if kw.get("attn_mask") is None else tuple(kw["attn_mask"].shape), kw.get("tap"))),
                with_kwargs=True)
    with torch.no_grad():
        model.forward_exits(images(3))
    # exit 0 reuses nothing; exits 1 and 2 get one (B, H, N, N) term per layer; only the exits
    # feeding a downstream one compute explicit logits, the last runs its configured kernel
    assert calls == [(0, None, "logits")] * 2 + [(1, (3, 2, 37, 37), "logits")] * 2 + [(2, (3, 2, 65, 65), None)] * 2


def test_handed_logits_include_the_upstream_reuse_term() -> None:
    model = tiny_dvt()
    x = images(2)
    with torch.no_grad():
        _, first = model.exits[0](x, hand_logits=True)
        _, second = model.exits[1](x, first, hand_logits=True)
        terms = list(model.exits[1].relation_reuse(first.logits))
        z = model.exits[1].vit.norm_pre(model.exits[1].vit._pos_embed(model.exits[1].vit.patch_embed(x)))
        block = model.exits[1].vit.blocks[0]
        q, k, _ = block.attn.qkv(block.norm1(z)).reshape(2, 37, 3, 2, 16).permute(2, 0, 3, 1, 4)
        expected = (q * block.attn.scale) @ k.transpose(-2, -1) + terms[0]
    assert second.logits.shape == (2, 2 * 2, 37, 37)
    torch.testing.assert_close(second.logits[:, :2], expected)


# ----------------------------------------------------------------------------- switches


@pytest.mark.parametrize("feature, relation", [(True, False), (False, True), (True, True), (False, False)])
def test_each_reuse_makes_the_downstream_depend_on_the_upstream(feature: bool, relation: bool) -> None:
    model = tiny_dvt(feature_reuse=feature, relation_reuse=relation)
    x = images()
    with torch.no_grad():
        before = model.forward_exits(x)
        model.exits[0].vit.blocks[0].attn.qkv.weight.mul_(1.5)  # perturb the upstream only
        after = model.forward_exits(x)
    depends = feature or relation
    assert torch.equal(before[0], after[0]) is False
    assert torch.equal(before[1], after[1]) is not depends and torch.equal(before[2], after[2]) is not depends


def test_without_reuse_each_exit_is_the_plain_backbone() -> None:
    model = tiny_dvt(feature_reuse=False, relation_reuse=False)
    x = images()
    with torch.no_grad():
        outputs = model.forward_exits(x)
        for k, (patch, pad) in enumerate(zip(TINY["patch_sizes"], TINY["paddings"])):
            spec = BackboneSpec(TINY["backbone"], kwargs=dict(embed_dim=32, depth=2, num_heads=2))
            plain = build_tokenized_vit(spec, 10, 32, patch, pad).eval()
            plain.load_state_dict(model.exits[k].vit.state_dict())
            torch.testing.assert_close(outputs[k], plain(x))
            assert model.exits[k].gflops() * 1e9 == pytest.approx(vit_flops(**vit_dims(plain)))


def test_reuse_switches_change_the_costs_as_expected() -> None:
    cost = {(f, r): tiny_dvt(feature_reuse=f, relation_reuse=r).exit_gflops()
            for f in (False, True) for r in (False, True)}
    d, m, hidden, out, blocks = 32, 128, 16, 8, 2
    for k, (up, grid) in enumerate([(4, 6), (6, 8)], start=1):
        n, n_up = grid * grid + 1, up * up
        resize = up * up * grid + up * grid * grid  # one token map's two small matmuls
        feature = blocks * (5 * n * out + n * out * m  # wider norm2 and fc1
                            + 5 * n_up * d + n_up * d * hidden + n_up * hidden * out + out * resize)
        hl = 2 * blocks
        # the relation resize, two taps per output: each input row along its key grid's columns
        # and rows, then each output patch row from four keyed rows
        relation_resize = (n_up + 1) * 2 * grid * (up + grid) + grid * grid * 4 * n
        relation = (n_up + 1) ** 2 * 2 * hl * 3 * hl + hl * relation_resize
        step = {key: (c[k] - c[k - 1]) * 1e9 for key, c in cost.items()}
        assert step[True, False] - step[False, False] == pytest.approx(feature)
        assert step[False, True] - step[False, False] == pytest.approx(relation)
        assert step[True, True] - step[False, False] == pytest.approx(feature + relation)
    assert len({c[0] for c in cost.values()}) == 1  # the first exit reuses nothing


# ----------------------------------------------------------------------------- costs


class ExitWithHandoff(torch.nn.Module):
    """One exit as fvcore can trace it: the handoff as plain tensors."""

    def __init__(self, exit_, hand_logits: bool) -> None:
        super().__init__()
        self.exit, self.hand_logits = exit_, hand_logits

    def forward(self, x, tokens=None, logits=None):
        upstream = None if tokens is None else Handoff(tokens, logits)
        return self.exit(x, upstream, hand_logits=self.hand_logits)[0]


@pytest.mark.parametrize("feature, relation", [(True, True), (True, False), (False, True)])
def test_analytic_exit_costs_equal_fvcore(feature: bool, relation: bool) -> None:
    model = tiny_dvt(feature_reuse=feature, relation_reuse=relation)
    x = images(1)
    with torch.no_grad():
        _, first = model.exits[0](x, hand_logits=relation)
        _, second = model.exits[1](x, first, hand_logits=relation)
    inputs = [(x,), (x, first.tokens, first.logits), (x, second.tokens, second.logits)]
    for k, exit_ in enumerate(model.exits):
        args = tuple(t for t in inputs[k] if t is not None)
        measured = fvcore_gflops(ExitWithHandoff(exit_, model._hands_logits(k)), *args)
        assert exit_.gflops() == pytest.approx(measured, rel=1e-9)


def test_deit_s_reference_gflops(deit_s: DVT) -> None:
    model = deit_s
    assert model.exit_names == ("7x7", "10x10", "14x14")
    assert model.exit_gflops() == pytest.approx([1.145, 3.656, 8.844], rel=0.02)
    assert model.exit_gflops()[0] == pytest.approx(1.145, rel=0.005)
    assert model.static_gflops() == pytest.approx(4.608, rel=0.005)
    plain = DVT.from_name(feature_reuse=False, relation_reuse=False, **DEIT_S)
    per_exit = [e.gflops() for e in plain.exits]
    assert per_exit[0] == pytest.approx(1.145, rel=0.005) and per_exit[2] == pytest.approx(4.608, rel=0.005)
    tokens_10 = vit_flops(100, 384, 12, 6, 1536, 1000, patch_size=23) / 1e9  # 10x10 DeiT-S
    assert per_exit[1] == pytest.approx(tokens_10)
    baseline = plain.static_baseline()
    assert baseline.patch_embed.grid_size == (14, 14) and not any(
        "feature_reuse" in n for n, _ in baseline.named_modules())


# ----------------------------------------------------------------------------- early exit


def test_batched_early_exit_equals_a_per_image_loop() -> None:
    model = tiny_dvt()
    x = images(12)
    with torch.no_grad():
        exits = model.forward_exits(x)
        confidences = [e.softmax(-1).amax(-1) for e in exits[:-1]]
        thresholds = split_thresholds(confidences, (1 / 3, 1 / 3, 1 / 3))
        batched = model.forward_adaptive(x, thresholds)
        assert sorted(set(batched.exit_index.tolist())) == [0, 1, 2]  # every exit answers some
        for i in range(len(x)):
            alone = model.forward_adaptive(x[i:i + 1], thresholds)
            assert alone.exit_index.item() == batched.exit_index[i].item()
            torch.testing.assert_close(alone.logits[0], batched.logits[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batched.logits[i], exits[batched.exit_index[i]][i], rtol=1e-5, atol=1e-6)
    costs = torch.tensor(model.exit_gflops())
    torch.testing.assert_close(batched.gflops, costs[batched.exit_index].float())


def test_thresholds_are_honoured() -> None:
    model = tiny_dvt()
    x = images(5)
    with torch.no_grad():
        exits = model.forward_exits(x)
        everyone_first = model.forward_adaptive(x, [0.0, 0.0])
        nobody_early = model.forward_adaptive(x, [math.inf, math.inf])
        model.set_thresholds([math.inf, 0.0])  # `forward` reads the buffer
        second = model(x)
    assert everyone_first.exit_index.tolist() == [0] * 5
    torch.testing.assert_close(everyone_first.logits, exits[0])
    assert nobody_early.exit_index.tolist() == [2] * 5
    torch.testing.assert_close(nobody_early.logits, exits[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, exits[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="takes 2 thresholds"):
        model.forward_adaptive(x, [0.5])


def test_split_thresholds_share_the_batch() -> None:
    confidences = [torch.linspace(0, 1, 100), torch.linspace(1, 0, 100)]
    thresholds = split_thresholds(confidences, (0.5, 0.3, 0.2))
    first = confidences[0] >= thresholds[0]
    second = ~first & (confidences[1] >= thresholds[1])
    assert (first.sum().item(), second.sum().item()) == (50, 30)


# ----------------------------------------------------------------------------- authors' checkpoint


def _authors_layout() -> dict[str, list[int]]:
    return json.loads(AUTHORS_KEYS.read_text())


def test_converter_places_every_tensor_of_the_authors_layout(deit_s: DVT) -> None:
    torch.manual_seed(0)
    theirs = {k: torch.randn(shape) for k, shape in _authors_layout().items()}
    model = deit_s
    converted = convert_authors_checkpoint(theirs, model.state_dict())
    assert len(converted) == len(theirs)  # none left unused
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert missing == ["exit_thresholds"] and unexpected == []
    landed = {id(v) for v in converted.values()}
    assert len(landed) == len(theirs)
    state = model.state_dict()
    for key in ("less_token.blocks.3.feature_resuse_mlp.1.fc2.weight", "normal_token.relation_reuse_conv.2.bias",
                "less_less_token.patch_embed.proj.weight", "less_token.blocks.11.norm2.weight"):
        ours = next(k for k, v in converted.items() if v is theirs[key])
        torch.testing.assert_close(state[ours], theirs[key])


def test_converter_names_missing_and_unexpected_keys(deit_s: DVT) -> None:
    theirs = {k: torch.zeros(shape) for k, shape in _authors_layout().items()}
    del theirs["less_token.blocks.0.feature_resuse_mlp.0.weight"]
    theirs["normal_token.dist_token"] = torch.zeros(1, 1, 384)
    theirs["less_less_token.head.weight"] = torch.zeros(10, 384)
    with pytest.raises(ValueError) as err:
        convert_authors_checkpoint(theirs, deit_s.state_dict())
    message = str(err.value)
    assert "unexpected keys ['normal_token.dist_token']" in message
    assert "missing keys ['exits.1.vit.blocks.0.feature_reuse.norm.weight']" in message
    assert "less_less_token.head.weight [10, 384] -> exits.0.vit.head.weight [1000, 384]" in message


def test_init_from_the_authors_file_through_the_lit_module(tmp_path: Path) -> None:
    hparams = dict(num_classes=10, img_size=32, patch_sizes=[8, 6, 4], paddings=[0, 2, 0],
                   reuse_hidden=16, reuse_dim=8, backbone=BackboneSpec(
                       name="vit_tiny_patch16_224", kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}))
    torch.manual_seed(0)
    theirs = in_authors_layout(tiny_dvt())
    path = tmp_path / "dvt_tiny.pth.tar"
    torch.save({"model_state_dict": theirs, "flops": np.array([1.1, 3.6, 8.8]),
                "dynamic_threshold": np.zeros((3, 2))}, path)
    module = DVTLitModule(init_from=str(path), **hparams)
    assert module.has_trained_weights()
    torch.testing.assert_close(module.net.exits[2].relation_reuse.mlp[0].weight,
                               theirs["normal_token.relation_reuse_conv.0.weight"])
    del theirs["less_token.norm.bias"]
    torch.save({"model_state_dict": theirs}, path)
    with pytest.raises(ValueError, match=r"missing keys \['exits.1.vit.norm.bias'\]"):
        DVTLitModule(init_from=str(path), **hparams)


# The authors' forward, written from their key layout alone (functional, no module of ours), so
# that the converter and DVT's wiring are checked against an independent reading of their model.


def _resize_matrix(grid: int, size: int, upsampled: int) -> torch.Tensor:
    """1-D nearest upsampling to `upsampled` then adaptive average pooling to `size`, as a
    (size, grid) matrix."""
    up = torch.zeros(upsampled, grid)
    up[torch.arange(upsampled), torch.arange(upsampled) * grid // upsampled] = 1
    pool = torch.zeros(size, upsampled)
    for i in range(size):
        start, end = (i * upsampled) // size, -(-((i + 1) * upsampled) // size)
        pool[i, start:end] = 1 / (end - start)
    return pool @ up


def _resize_2d(t: torch.Tensor, grid: int, size: int, upsampled: int) -> torch.Tensor:
    """(..., grid*grid) -> (..., size*size), separable."""
    r = _resize_matrix(grid, size, upsampled)
    maps = t.reshape(*t.shape[:-1], grid, grid)
    return (r @ maps @ r.T).reshape(*t.shape[:-1], size * size)


def conv_tokens(patch: int, pad: int):  # noqa: ANN201
    """The authors' DeiT tokenizer of one exit: (state, exit name, images) -> (B, 1+N, D)."""

    def tokens(state: dict, name: str, x: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(x, state[f"{name}.patch_embed.proj.weight"], state[f"{name}.patch_embed.proj.bias"],
                     stride=patch, padding=pad)
        z = torch.cat([state[f"{name}.cls_token"].expand(len(x), -1, -1), z.flatten(2).transpose(1, 2)], 1)
        return z + state[f"{name}.pos_embed"]

    return tokens


def authors_forward(state: dict, x: torch.Tensor, exits: list, heads: int, eps: float = 1e-6,
                    upsampled: dict[int, int] | None = None) -> list:
    """The authors' cascade: `exits` lists (name, tokenizer) coarsest first; `upsampled` maps a
    downstream grid to their nearest-upsampling side (their code: {10: 14, 14: 20}; default x2)."""
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], state[p + ".weight"], state[p + ".bias"], eps)  # noqa: E731
    lin = lambda t, p: F.linear(t, state[p + ".weight"], state.get(p + ".bias"))  # noqa: E731
    outputs, tokens, relations, up = [], None, None, None
    for name, tokenize in exits:
        z = tokenize(state, name, x)
        (b, n, d), grid = z.shape, math.isqrt(z.shape[1] - 1)
        stretch = (upsampled or {}).get(grid, 2 * up) if up else None
        terms = None
        if f"{name}.relation_reuse_conv.0.weight" in state:
            r = F.conv2d(relations, state[f"{name}.relation_reuse_conv.0.weight"], state[f"{name}.relation_reuse_conv.0.bias"])
            r = F.conv2d(F.gelu(r), state[f"{name}.relation_reuse_conv.2.weight"], state[f"{name}.relation_reuse_conv.2.bias"])
            r = torch.cat([r[..., :1], _resize_2d(r[..., 1:], up, grid, stretch)], -1)  # keys
            r = r.transpose(-1, -2)
            r = torch.cat([r[..., :1], _resize_2d(r[..., 1:], up, grid, stretch)], -1).transpose(-1, -2)  # queries
            terms = r.split(heads, dim=1)
        logits = []
        depth = len({k.split(".")[2] for k in state if k.startswith(f"{name}.blocks.")})
        for i in range(depth):
            p = f"{name}.blocks.{i}"
            q, k, v = lin(ln(z, p + ".norm1"), p + ".attn.qkv").reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
            a = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            if terms is not None:
                a = a + terms[i]
            logits.append(a)
            z = z + lin((a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d), p + ".attn.proj")
            h = z
            if p + ".feature_resuse_mlp.0.weight" in state:
                f = ln(tokens, p + ".feature_resuse_mlp.0")
                f = lin(F.gelu(lin(f, p + ".feature_resuse_mlp.1.fc1")), p + ".feature_resuse_mlp.1.fc2")
                f = _resize_2d(f.transpose(1, 2), up, grid, stretch).transpose(1, 2)
                h = torch.cat([z, torch.cat([f.new_zeros(b, 1, f.shape[-1]), f], 1)], -1)
            z = z + lin(F.gelu(lin(ln(h, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
        outputs.append(lin(ln(z, f"{name}.norm")[:, 0], f"{name}.head"))
        tokens, relations, up = z[:, 1:], torch.cat(logits, 1), grid
    return outputs


def in_authors_layout(model: DVT) -> dict[str, torch.Tensor]:
    """Random tensors of `model`'s shapes under the authors' names (the JSON layout's naming)."""
    names = authors_exit_names(model.num_exits)
    theirs = {}
    for key, value in model.state_dict().items():
        if key == "exit_thresholds":
            continue
        k, rest = int(key.split(".")[1]), key.split(".", 2)[2]
        rest = rest.replace("relation_reuse.mlp.", "relation_reuse_conv.").replace("vit.", "", 1)
        rest = rest.replace(".feature_reuse.norm.", ".feature_resuse_mlp.0.").replace(
            ".feature_reuse.mlp.", ".feature_resuse_mlp.1.")
        theirs[f"{names[k]}.{rest}"] = torch.randn_like(value) * 0.2
    return theirs


def authors_exit_names(count: int) -> tuple[str, ...]:
    """The authors' exit models of a `count`-exit cascade (two exits: the first and the last)."""
    return AUTHORS_EXITS if count == 3 else (AUTHORS_EXITS[0], AUTHORS_EXITS[-1])


# Three exits (upsampling x2 everywhere, as the authors' 7 -> 14 -> 10 and 10 -> 20 -> 14), and two
# exits 4x4 -> 8x8 through a 10x10 upsampling (a small mirror of their 7 -> 20 -> 14 two-exit resize).
@pytest.mark.parametrize("patches, pads, upsampled", [([8, 6, 4], [0, 2, 0], None), ([8, 4], [0, 0], [10])])
def test_converted_model_computes_the_authors_function(patches: list[int], pads: list[int],
                                                       upsampled: list[int] | None) -> None:
    model = tiny_dvt(patch_sizes=patches, paddings=pads, reuse_upsample=upsampled)
    torch.manual_seed(3)  # random weights everywhere (zero biases would hide wiring mistakes)
    theirs = in_authors_layout(model)
    model.load_state_dict(convert_authors_checkpoint(theirs, model.state_dict()), strict=False)
    x = images(3)
    names = authors_exit_names(len(patches))
    with torch.no_grad():
        ours = model.forward_exits(x)
        exits = [(name, conv_tokens(patch, pad)) for name, patch, pad in zip(names, patches, pads)]
        reference = authors_forward(theirs, x, exits, heads=2, upsampled={8: upsampled[0]} if upsampled else None)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- CLI


def test_demo_fit_then_test_honours_thresholds(run_cli, tmp_path: Path) -> None:
    config = ["--config", str(REPO / "configs/demo/dvt.yaml")]
    small = ["--model.init_args.backbone.kwargs", "{embed_dim: 32, depth: 2, num_heads: 2}"]
    run_cli("fit", *config, *small, *FAST_TRAINER)
    ckpt = str(tmp_path / "runs/demo_dvt/version_0/checkpoints/last.ckpt")
    cli = run_cli("test", *config, *small, *FAST_TRAINER, "--ckpt_path", ckpt)
    assert float(cli.trainer.callback_metrics["test/exit_8x8/fraction"]) == 1.0  # default: all to the last
    # Thresholds by hand with the weights through init_from: LightningCLI replaces the model
    # arguments with the checkpoint's hyperparameters when --ckpt_path is given.
    for thresholds, fractions in (("[0.0,0.0]", (1, 0, 0)), ("[.inf,0.0]", (0, 1, 0))):
        cli = run_cli("test", *config, *small, *FAST_TRAINER, "--model.init_args.init_from", ckpt,
                      "--model.init_args.thresholds", thresholds)
        metrics, net = cli.trainer.callback_metrics, cli.model.net
        assert net.exit_names == ("4x4", "6x6", "8x8")
        assert tuple(float(metrics[f"test/exit_{n}/fraction"]) for n in net.exit_names) == fractions
        assert float(metrics["test/gflops"]) == pytest.approx(net.exit_gflops()[fractions.index(1)], rel=1e-5)
        assert {f"test/exit_{n}/top1" for n in net.exit_names} <= set(metrics)


def test_relation_reuse_without_autograd_equals_with_it() -> None:
    """The CPU inference path (image by image, in-place bias adds and GELU, the compiled resize)
    computes the training path's numbers, also on upstream logits that are an indexed,
    non-contiguous view."""
    torch.manual_seed(0)
    reuse = RelationReuse(num_heads=2, depth=3, upstream_grid=2, grid=3)
    logits = torch.randn(3, 6, 5, 5).transpose(-1, -2)
    with_grad = list(reuse(logits))
    with torch.no_grad():
        without = list(reuse(logits))
    for a, b in zip(with_grad, without, strict=True):
        torch.testing.assert_close(a.detach(), b)


def test_inference_under_cpu_bfloat16_autocast() -> None:
    """`precision: bf16-mixed` on CPU: the relationship reuse's `out=` matmuls are not autocast,
    so they must run in the logits' dtype (they once raised a dtype error)."""
    model, x = tiny_dvt(), images()
    with torch.no_grad():
        reference = model.forward_exits(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.forward_exits(x)
    for low, full in zip(mixed, reference, strict=True):
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), full, atol=0.05, rtol=0.05)


def test_fused_attention_trains_the_relationship_reuse_like_explicit_attention() -> None:
    """The last exit's reuse term enters fused SDPA (the default) as `attn_mask`: the reuse MLPs
    must get the same gradients through it as through the explicit matmuls."""
    model, x = tiny_dvt(), images(2)
    grads = {}
    for fused in (False, True):
        set_fused_attn(model, fused)
        model.zero_grad()
        sum(logits.pow(2).mean() for logits in model.forward_train(x)).backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if "relation_reuse" in n}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == 8
    for name, grad in grads[False].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-7)
