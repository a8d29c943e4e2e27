"""DVT's compiled CPU kernel for the relationship resize (`resize_relation.cpp`).

The kernel exists because PyTorch has no fast form of this resize on CPU. Each output of the
Figure-5 resize reads at most two inputs per axis. As matmuls (`resize.resize_keys` /
`resize_queries`), two of the four passes contract a middle axis, i.e. thousands of tiny batched
products, and every pass writes a map-sized intermediate. The kernel resizes one map at a time in
cache and writes each output once (its measured speed against the matmuls, with the commit:
docs/performance.md, DVT). `resize.resize_relation` runs it at CPU inference.

- **When it is built.** At first use, with PyTorch's own extension builder (g++ and ninja),
  then cached (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`).
- **Without it.** If it cannot be built, a warning says why, and the resize computes the same
  numbers with the matmuls; so it does when `ADAPTIVE_VIT_CPU_KERNEL=0`.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

SWITCH = "ADAPTIVE_VIT_CPU_KERNEL"
SOURCE = Path(__file__).with_name("resize_relation.cpp")


@functools.cache
def cpu_kernel() -> ModuleType | None:
    """The compiled CPU kernel, built on first use; None if it is switched off or cannot be built."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        # said every time, as torch does not tell in advance whether it will build or reuse
        print("adaptive-vit: loading DVT's CPU resize kernel (built on first use, ~30 s)", file=sys.stderr)
        return load("adaptive_vit_resize_relation", [str(SOURCE)],
                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, no OpenMP: fall back, say why and how to fix
        warnings.warn(
            f"DVT's CPU resize kernel could not be built ({type(error).__name__}: {error}). "
            "Relationship reuse falls back to the matmul resize: the same numbers, slower on CPU. "
            f"To build it, install g++ and ninja (`pip install ninja`); set {SWITCH}=0 to skip it.",
            stacklevel=2,
        )
        return None
