"""Every Triton kernel compiles for sm_80 and sm_90 with the settings its launcher uses, and fits.

No GPU needed: Triton compiles for a named target and its bundled ptxas reports registers and
spills (:mod:`longshard.kernels.triton_compile`, which lists the shipped settings and the limits:
shared memory within the target's per-block limit, else the first launch raises
``OutOfResources``; at most 255 registers; no spills for the bf16/fp16 forward and dQ, a stated
bound elsewhere). Compiling needs the real JIT, so it runs in a subprocess without the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from longshard.kernels.triton_support import triton_installed

pytestmark = [
    pytest.mark.triton_compile,
    pytest.mark.skipif(not triton_installed(), reason="triton is not installed"),
]


def _compiled_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_kernels_fit_their_targets(kernel):
    proc = subprocess.run([sys.executable, "-m", "longshard.kernels.triton_compile", "--kernel", kernel],
                          env=_compiled_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    from longshard.kernels.triton_compile import cases

    assert len(records) == len(cases(kernel))
    bad = [f"{r['case']}: {'; '.join(r['problems'])} (warps {r['num_warps']}, stages {r['num_stages']}, "
           f"{r['registers']} regs, {r['shared']} B shared)" for r in records if r["problems"]]
    assert not bad, "\n".join(bad)


OFFSETS_CHECK = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from longshard.kernels.triton_compile import Case, build, signature

failures = []
for family, flags in (("block_sparse", "win+doc"), ("lightning", "doc")):
    for kernel in ("fwd", "dq", "dkdv"):
        fn, types, constexprs, warps, stages = build(Case(family, kernel, "bf16", 128, 64, 1, flags, 90))
        src = ASTSource(fn=fn, signature=signature(fn, types, constexprs), constexprs=constexprs)
        ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages}).asm["ttir"]
        for arg in (n for n, t in types.items() if t == "*bf16" and n in fn.arg_names):
            moved = re.findall(rf"tt\.addptr %{arg}, %\S+ : !tt\.ptr<bf16>, (i\d+)", ttir)
            raw = re.findall(rf"tt\.splat %{arg} ", ttir)  # per-row offsets on the unmoved base
            body = [line for line in ttir.splitlines() if "tt.func" not in line]
            if not any(re.search(rf"%{arg}\b", line) for line in body):
                continue  # an argument this kernel does not use (lightning's dQ never reads Q)
            if not moved or any(w != "i64" for w in moved) or raw:
                failures.append(f"{family} {kernel} {arg}: base offsets {moved}, raw per-row uses {len(raw)}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_activation_offsets_are_64_bit():
    """Each program moves every activation pointer to its own (batch, head) slab with a 64-bit scalar
    offset before adding per-row 32-bit offsets, so ((b*H + h)*S + pos)*D may pass 2^31 (32 heads x
    128K tokens x head dim 128 x batch 4 does) while what is added per row stays within one head set
    (stacked heads x S x D elements: below 2^31 up to 1M tokens at head dim 128 with 8 stacked heads).
    Checked in each kernel's Triton IR (bf16, so activations are its only bf16 pointers)."""
    proc = subprocess.run([sys.executable, "-c", OFFSETS_CHECK], env=_compiled_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
