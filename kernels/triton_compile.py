"""Compile a Triton kernel ahead of time for a CUDA target and read its resources, without a GPU.

Triton lowers a ``@triton.jit`` function to PTX for any target it knows; its bundled ``ptxas``
assembles that PTX and reports, per kernel, registers per thread and spill bytes (``-v``), and the
compiled metadata carries the shared memory the kernel asks for at launch. These are the figures
that decide whether a launch succeeds (``OutOfResources`` above the device's shared memory per
block) and whether it is fast (spills go to local memory).

:func:`cases` lists the shipped settings of every kernel (head dim 64/128, blocks / chunks 16-128,
bf16 / fp16 / fp32, GQA stacking, windows and documents, NSA selection), each built exactly as its
launcher builds it (the ``launch_settings`` of each Triton module, from its ``LAUNCH`` table), and
:func:`check` states the limits. ``python -m longshard.kernels.triton_compile --kernel fwd`` prints
one JSON record per case; ``tests/kernels/test_triton_compile.py`` runs it (Triton's interpreter off).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Shared memory one block may use (opt-in maximum), bytes: A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_LIMIT = {80: 166_912, 90: 232_448}
MAX_REGISTERS = 255

_POINTER_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass(frozen=True)
class Resources:
    """What one compiled kernel needs per block / thread on its target.

    Args:
        shared: shared memory bytes per block requested at launch.
        registers: registers per thread.
        spill_bytes: bytes spilled to local memory per thread (stores).
        num_warps, num_stages: the launch settings it was compiled with.
        loaded: on a GPU of that arch, ``ok`` or the error of loading the compiled kernel onto the
            device (``OutOfResources`` for too much shared memory); None when not tried.
    """

    shared: int
    registers: int
    spill_bytes: int
    num_warps: int
    num_stages: int
    loaded: str | None = None


def signature(fn, types: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton signature for ``fn``: constexpr for the names in ``constexprs``, else ``types[name]``.

    Raises:
        KeyError: an argument of ``fn`` has neither (the caller's table is out of date).
    """
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in types:
            out[name] = types[name]
        else:
            raise KeyError(f"{fn.__name__}: no type for argument {name!r}")
    return out


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) of the kernel in ``ptx`` from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([tool.path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {proc.stderr[-2000:]}")
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    if regs is None:
        raise RuntimeError(f"ptxas -v printed no register count: {text[-1000:]}")
    return int(regs.group(1)), int(spills.group(1)) if spills else 0


def compile_resources(fn, types: dict[str, str], constexprs: dict[str, Any], arch: int,
                      num_warps: int, num_stages: int) -> Resources:
    """Compile ``fn`` for ``sm_<arch>`` with these launch settings and read its resources.

    Args:
        fn: a ``@triton.jit`` function.
        types: Triton type per runtime argument (``*bf16``, ``*i32``, ``i32``, ``fp32``, ...).
        constexprs: values of its ``tl.constexpr`` arguments.
        arch: compute capability x 10 (80, 90).
        num_warps, num_stages: as passed at launch.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature(fn, types, constexprs), constexprs=constexprs)
    warp = 32
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, warp),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    regs, spills = _ptxas_report(kernel.asm["ptx"], arch)
    loaded = None
    if _device_arch() == arch:  # a GPU of this arch is here: load the cubin as a launch would
        try:
            kernel._init_handles()
            loaded = "ok"
        except Exception as e:  # noqa: BLE001 - report whatever the driver says, per kernel
            loaded = f"{type(e).__name__}: {e}"[:300]
    return Resources(int(kernel.metadata.shared), regs, spills, num_warps, num_stages, loaded)


def _device_arch() -> int | None:
    """The visible CUDA device's arch as the launch tables key it (80 / 90), or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return 90 if torch.cuda.get_device_capability()[0] >= 9 else 80


def pointer(dtype: str) -> str:
    """Triton pointer type of an activation dtype name (``bf16``, ``fp16``, ``fp32``)."""
    return _POINTER_TYPES[dtype]


# Spill bounds (bytes per thread) where zero is not demanded. The bf16/fp16 forward and dQ must not
# spill. dK/dV keeps two fp32 accumulators of BLOCK_N x D next to K, V and the recomputed tiles; a
# few hundred bytes there cost less than halving the key rows per program (twice the Q/dO loads).
# Observed maxima with triton 3.9 (sm_90 / sm_80): dK/dV bf16 152 B (lightning, D 128), fp32 536 B.
# The fp32 IEEE branch is the reference-precision path, not the fast one: under bf16 autocast the
# kernels get bf16.
SPILL_BOUND = {("dkdv", "tc"): 256, ("fwd", "fp32"): 512, ("dq", "fp32"): 512, ("dkdv", "fp32"): 1024}
KERNELS = ("fwd", "dq", "dkdv")


@dataclass(frozen=True)
class Case:
    """One shipped launch: family (``block_sparse``/``lightning``), kernel, dtype, head dim, block or
    chunk, stacked heads, flags (``win+doc``, ``select``, ``bias+doc``, ``doc``), target arch."""

    family: str
    kernel: str
    dtype: str
    head_dim: int
    block: int
    share: int
    flags: str
    arch: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.kernel}-{self.dtype}-d{self.head_dim}-b{self.block}-x{self.share}-" \
               f"{self.flags}-sm{self.arch}"


def cases(kernel: str) -> list[Case]:
    """The shipped settings of ``kernel`` (``fwd``, ``dq``, ``dkdv``) in both Triton kernel families."""
    out = []
    for D in (64, 128):
        for block in (16, 32, 64, 128):
            for share in sorted({1, min(8, 128 // block)}):  # no stacking / the most MAX_ROWS allows
                out.append(Case("block_sparse", kernel, "bf16", D, block, share, "win+doc", 90))
            out.append(Case("block_sparse", kernel, "fp32", D, block, 1, "win+doc", 90))
            out.append(Case("lightning", kernel, "bf16", D, block, 1, "doc", 90))
        out.append(Case("block_sparse", kernel, "fp16", D, 64, 2, "win+doc", 90))
        out.append(Case("block_sparse", kernel, "bf16", D, 64, 1, "select", 90))  # NSA's selected branch
        for block, share, arch in ((64, 2, 90), (128, 1, 90), (64, 2, 80)):  # DMA: per-key bias, packed
            out.append(Case("block_sparse", kernel, "bf16", D, block, share, "bias+doc", arch))
        for block, share in ((128, 1), (64, 2), (16, 8)):  # A100: the largest tiles
            out.append(Case("block_sparse", kernel, "bf16", D, block, share, "win+doc", 80))
        out.append(Case("lightning", kernel, "fp32", D, 64, 1, "doc", 90))
        out.append(Case("lightning", kernel, "bf16", D, 128, 1, "doc", 80))
    return out


def block_sparse_types(act: str) -> dict[str, str]:
    """Argument types of the block-sparse kernels with activations of dtype ``act``."""
    types = {n: pointer(act) for n in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}
    types.update({n: "*fp32" for n in ("LSE", "DELTA", "BIAS", "DBIAS")})
    types.update({n: "*i32" for n in ("IDX", "CNT", "IDXT", "CNTT", "WIN", "SINK", "DOCQ", "DOCK", "SEL")})
    types.update({n: "fp32" for n in ("qk_scale", "scale")})
    types.update({n: "i32" for n in ("si_b", "si_h", "si_q", "si_k", "sc_b", "sc_h", "H", "S", "D", "GROUP",
                                     "KV_H", "N_QB", "Q_SHIFT")})
    return types


def build(case: Case) -> tuple[Any, dict[str, str], dict[str, Any], int, int]:
    """(kernel function, argument types, constexprs, num_warps, num_stages) as the launcher builds them."""
    f32 = case.dtype == "fp32"
    if case.family == "block_sparse":
        import longshard.kernels.block_sparse.triton as bst

        launch = bst.launch_settings(case.kernel, case.block, case.share, case.head_dim, f32)
        warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
        sel = case.flags == "select"
        constexprs = dict(BLOCK=case.block, SHARE=case.share, BLOCK_D=case.head_dim, HAS_WIN=case.flags == "win+doc",
                          HAS_DOC=not sel, F32=f32, N_SEL=16 if sel else 1, HAS_SEL=sel,
                          HAS_BIAS=case.flags == "bias+doc", **launch)
        fn = {"fwd": bst._bs_fwd, "dq": bst._bs_bwd_dq, "dkdv": bst._bs_bwd_dkdv}[case.kernel]
        return fn, block_sparse_types(case.dtype), constexprs, warps, stages
    import longshard.kernels.lightning.triton as lt

    chunk, block_d, block_e, _ = lt._launch_shape(case.head_dim, case.head_dim, case.block, f32, case.arch)
    launch = lt.launch_settings(case.kernel, block_d, f32)
    warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
    types = {n: pointer(case.dtype) for n in ("Q", "K", "V", "OUT", "DO", "DV")}
    types.update({n: "*fp32" for n in ("A", "S0", "SF", "DQP", "DKP", "DSF", "DS0")})
    types.update({"DOC": "*i32", **{n: "i32" for n in ("H", "S", "D", "E", "N_CHUNKS")}})
    constexprs = dict(CHUNK=chunk, BLOCK_D=block_d, BLOCK_E=block_e, HAS_DOC=True, IEEE=f32, **launch)
    constexprs["HAS_DSF" if case.kernel == "dkdv" else "HAS_INIT"] = True
    fn = {"fwd": lt._lightning_fwd, "dq": lt._lightning_bwd_dq, "dkdv": lt._lightning_bwd_dkdv}[case.kernel]
    return fn, types, constexprs, warps, stages


def check(case: Case, res: Resources) -> list[str]:
    """What is wrong with ``res`` for ``case`` (empty when it fits)."""
    problems = []
    if res.shared > SHARED_LIMIT[case.arch]:
        problems.append(f"shared memory {res.shared} B > sm_{case.arch} limit {SHARED_LIMIT[case.arch]}")
    if res.registers > MAX_REGISTERS:
        problems.append(f"{res.registers} registers > {MAX_REGISTERS}")
    bound = SPILL_BOUND.get((case.kernel, "fp32" if case.dtype == "fp32" else "tc"), 0)
    if res.spill_bytes > bound:
        problems.append(f"{res.spill_bytes} B spilled per thread (bound {bound})")
    if res.loaded not in (None, "ok"):
        problems.append(f"does not load on this device: {res.loaded}")
    return problems


def measure(case: Case) -> dict:
    """One JSON-friendly record: the case, its resources and its problems."""
    fn, types, constexprs, warps, stages = build(case)
    res = compile_resources(fn, types, constexprs, case.arch, warps, stages)
    return {"case": case.name, **asdict(res), "problems": check(case, res)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile the Triton kernels for sm_80/sm_90 and report resources.")
    ap.add_argument("--kernel", choices=KERNELS, action="append", help="default: all")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--limit", type=int, default=0, help="only the first N cases per kernel (smoke runs)")
    args = ap.parse_args(argv)
    todo = [c for k in (args.kernel or KERNELS) for c in (cases(k)[: args.limit] if args.limit else cases(k))]
    with ProcessPoolExecutor(args.jobs) as pool:
        for rec in pool.map(measure, todo):
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
