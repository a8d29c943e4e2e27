"""What MIA-Former's controllers cost in time: each fixed pattern with and without them.

For every fixed decision pattern of `adaptive-vit benchmark` (`MIAFormer.fixed_patterns`), times
on the CPU, in turns with the static backbone (random weights):

- ``<pattern>``: the sliced model as the benchmark runs it, controllers included;
- ``<pattern>, blocks alone``: the same decisions applied to the same sliced blocks with no
  controller run, its GFLOPs counted without the controllers'.

Both rows give efficiency = speedup / FLOPs reduction (`trainer.benchmark_row`). The second row
says how far the sliced blocks by themselves reach: a batch-1 target they miss cannot be met by
making the controllers cheaper. The blocks-alone forward (`MIAFormer.forward_blocks`) gives the
same logits as the full one (tested).

The first row also gets ``efficiency_at_flops_share``: the efficiency the pattern would have if
its controllers took exactly their share of FLOPs in time, at the static model's FLOPs rate (the
blocks-alone latency plus static latency × controller GFLOPs / static GFLOPs). It is what the
cheapest possible controllers would reach on this machine.

Last, ``dense L… D… H… M…`` rows (depth, width, heads, MLP hidden) time smaller static ViTs
built like the backbone (`dense_references`: fewer blocks, a narrower MLP, half the width and
heads): what a plain model with fewer FLOPs reaches on this machine at this batch size, with
nothing sliced and no controller.

A second table times one controller alone (`controller_in_context`): its decisions with every
branch run, right after itself (warm caches), right after one backbone block, and after an add
over 128 MB, more than DeiT-S's 84 MB of weights (cold caches), next to its time per block inside
the model (all on with controllers minus blocks alone, over the depth). It shows how much of a
controller's time is its weights and code coming back from memory after the backbone evicted them.

    python -m benchmarks.mia_controllers                       # DeiT-S, batch 1, random weights
    python -m benchmarks.mia_controllers --batch_size 64 --repeats 5 --output mia_controllers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from adaptive_vit.backbones import vit_dims
from adaptive_vit.flops import vit_flops
from adaptive_vit.methods.mia.model import Decisions, MIAFormer
from adaptive_vit.runtime import keep_freed_memory
from adaptive_vit.trainer import benchmark_row, print_table, time_turns


def blocks_alone_gflops(net: MIAFormer, decisions: Decisions) -> float:
    """Mean executed GFLOPs of `decisions` with the controllers' FLOPs left out."""
    executed = net.cost.without_controllers().executed(decisions.blocks.float(), decisions.heads.float(),
                                                       decisions.tokens.sum(-1).float())
    return float(executed.mean()) / 1e9


def measure(net: MIAFormer, batch_size: int, repeats: int, warmup: int = 2) -> list[dict[str, Any]]:
    """Rows (`benchmark_row`, mode "<pattern>" and "<pattern>, blocks alone") of every fixed pattern."""
    net = net.eval()
    static = net.static_baseline().eval()
    x = torch.randn(batch_size, *net.input_size())
    static_gflops = net.static_gflops()
    runs, gflops = {"static": lambda: static(x)}, {"static": static_gflops}
    with torch.inference_mode():
        for label, decisions in net.fixed_patterns(batch_size).items():
            runs[label] = lambda d=decisions: net.forward_sliced(x, d)
            gflops[label] = float(runs[label]().gflops.mean())
            runs[f"{label}, blocks alone"] = lambda d=decisions: net.forward_blocks(x, d)
            gflops[f"{label}, blocks alone"] = blocks_alone_gflops(net, decisions)
        for label, dense in dense_references(net).items():
            runs[label] = lambda m=dense: m(x)
            gflops[label] = vit_flops(**vit_dims(dense)) / 1e9
        turns = time_turns(runs, repeats, warmup)
    rows = [benchmark_row(label, batch_size, turns[label], turns["static"], gflops[label], static_gflops)
            for label in runs]
    by_mode = {r["mode"]: r for r in rows}
    for row in rows:
        alone = by_mode.get(f"{row['mode']}, blocks alone")
        if alone is not None:
            row["efficiency_at_flops_share"] = efficiency_at_flops_share(row, alone, by_mode["static"])
    return rows


def dense_references(net: MIAFormer) -> dict[str, nn.Module]:
    """Smaller static timm ViTs shaped like `net`'s backbone (same patches, classes, cls token),
    random weights, by label: 3/4 and 1/2 of its blocks, half its MLP width, half its width and
    heads (DeiT-S → DeiT-Ti's shape). A variant that equals another (a tiny backbone) is listed once."""
    d = net.family.dims(net.backbone).as_dict()
    img = net.input_size()[1:]
    base = dict(img_size=img, patch_size=d["patch_size"], in_chans=d["in_chans"], num_classes=d["num_classes"],
                embed_dim=d["dim"], depth=d["depth"], num_heads=d["num_heads"], mlp_ratio=d["mlp_hidden"] / d["dim"])
    variants = [
        dict(depth=max(1, 3 * d["depth"] // 4)),
        dict(depth=max(1, d["depth"] // 2)),
        dict(mlp_ratio=base["mlp_ratio"] / 2),
        dict(embed_dim=d["dim"] // 2, num_heads=max(1, d["num_heads"] // 2)),
    ]
    models = {}
    for change in variants:
        kwargs = {**base, **change}
        label = "dense L{depth} D{embed_dim} H{num_heads} M{mlp}".format(
            **kwargs, mlp=int(kwargs["embed_dim"] * kwargs["mlp_ratio"]))  # depth, width, heads, MLP hidden
        models.setdefault(label, VisionTransformer(**kwargs).eval())
    return models


def efficiency_at_flops_share(pattern: dict[str, Any], alone: dict[str, Any], static: dict[str, Any]) -> float:
    """Efficiency of `pattern` (rows of `benchmark_row`) if its controllers ran at the static
    model's FLOPs rate: the blocks-alone latency plus the controllers' FLOPs share of the static
    latency."""
    controllers_ms = static["latency_ms"] * (pattern["gflops"] - alone["gflops"]) / static["gflops"]
    speedup = static["latency_ms"] / (alone["latency_ms"] + controllers_ms)
    return speedup / pattern["flops_reduction"]


def controller_in_context(net: MIAFormer, batch_size: int, repeats: int, flush_mb: int = 128) -> dict[str, float]:
    """Median ms of one controller's decisions (the middle block's, every branch run:
    `MIAFormer._decide_sliced` under the all-on pattern) on a random block input, timed right
    after itself, right after its block, and after an add over `flush_mb` MB (read and written)."""
    net = net.eval()
    layer = net.depth // 2
    controller, block = net.controllers[layer], net.backbone.blocks[layer]
    x = torch.randn(batch_size, controller.prefix + net.tokens_per_layer[layer], controller.dim)
    everything = net.fixed_patterns(batch_size)["all on"]
    flush = torch.zeros(flush_mb * 2**20 // 4)

    def decide() -> Any:
        return net._decide_sliced(controller, x, layer, everything)

    with torch.inference_mode():
        return time_after({"warm (right after itself)": decide, "right after one block": lambda: block(x),
                           f"after an add over {flush_mb} MB": lambda: flush.add_(1.0)}, decide, repeats)


def time_after(contexts: dict[str, Callable[[], Any]], run: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median ms of `run` right after each context's untimed `before` call, in turns (before 1,
    run, before 2, run, ..., `repeats` times) so that load changes hit every context alike."""
    times: dict[str, list[float]] = {label: [] for label in contexts}
    for _ in range(max(1, repeats)):
        for label, before in contexts.items():
            before()
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) * 1e3 for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="deit_small_patch16_224", help="timm ViT name")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15, help="timed turns (medians reported)")
    parser.add_argument("--output", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does: no page faults on every fresh activation
    torch.manual_seed(0)
    net = MIAFormer.from_name(args.backbone)
    rows = measure(net, args.batch_size, args.repeats)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    print_table(
        f"MIA-Former ({args.backbone}), batch {args.batch_size}, {torch.get_num_threads()} threads",
        ["mode", "latency ms", "GFLOPs", "FLOPs reduction", "speedup", "efficiency", "efficiency, turns",
         "efficiency, controllers at their FLOPs share"],
        [[r["mode"], f"{r['latency_ms']:.1f}", f"{r['gflops']:.3f}", f"{r['flops_reduction']:.2f}x",
          f"{r['speedup']:.2f}x", f"{r['efficiency']:.2f}", "{:.2f}–{:.2f}".format(*r["efficiency_spread"]),
          f"{r['efficiency_at_flops_share']:.2f}" if "efficiency_at_flops_share" in r else ""]
         for r in rows],
    )
    by_mode = {r["mode"]: r for r in rows}
    in_model = (by_mode["all on"]["latency_ms"] - by_mode["all on, blocks alone"]["latency_ms"]) / net.depth
    alone = controller_in_context(net, args.batch_size, args.repeats)
    print_table(f"one controller, batch {args.batch_size}", ["context", "ms"],
                [[label, f"{ms:.3f}"] for label, ms in {**alone, "inside the model (per block)": in_model}.items()])


if __name__ == "__main__":
    main()
