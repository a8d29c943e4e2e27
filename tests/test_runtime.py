"""`keep_freed_memory`: freed tensor memory is reused instead of page-faulted in afresh."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from adaptive_vit.runtime import OPT_OUT

# Eight forwards making 64 MB tensors; the page faults of the last six (the first two grow the heap).
SCRIPT = """
import resource, torch
from adaptive_vit.runtime import keep_freed_memory
applied = keep_freed_memory()
x, w = torch.randn(4096, 1024), torch.randn(1024, 4096)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.gelu(x @ w)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[2:]))
"""


def _faults(opt_out: bool) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT}
    if opt_out:
        env[OPT_OUT] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_keep_freed_memory_removes_most_page_faults_and_can_be_turned_off():
    applied, tuned = _faults(opt_out=False)
    not_applied, system = _faults(opt_out=True)
    assert applied and not not_applied
    assert system > 6 * 64e6 / 4096 * 0.9  # glibc's default: every 64 MB tensor faults afresh
    assert tuned < system / 2, (tuned, system)
