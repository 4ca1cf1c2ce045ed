"""Triton kernels vs the trusted baselines, measured in the same run (CUDA).

* block-sparse kernel with a dense causal mask, an S2 mask and a sink + sliding-window mask, vs
  flash-attn dense causal (or SDPA's flash backend when flash-attn is absent) and vs
  ``flex_attention`` (compiled) with the same per-head mask;
* DMA (value-derived key bias, top ``DMA_KEEP`` blocks per query block) through the same kernel with
  the bias as a per-key logit term, vs the dense baseline and vs DMA's PyTorch gather path;
* lightning kernel vs our PyTorch blocked form.

Forward and forward+backward times are medians over repetitions after warm-up (CUDA events).
``flop_ratio`` = dense causal FLOPs / the mask's FLOPs at block granularity (what the kernel
computes), the ideal speed-up; ``speedup_vs_baseline`` = baseline / kernel forward+backward time.

    python benchmarks/kernels.py --json kernels.json            # GPU: 8K..128K
    python benchmarks/kernels.py --quick                        # GPU: 8K and 32K
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke     # CPU: tiny shapes, checks the script only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

H, KV, D, BLOCK = 16, 16, 128, 64
DMA_KEEP = 16  # DMA's key blocks per query block (1,024 keys at block 64)


def masks(S: int, block: int, heads: int) -> dict:
    from longshard.kernels.block_sparse import SparsePattern
    from longshard.kernels.block_sparse.pattern import sink_window_pattern
    from longshard.models.attention.s2 import S2Options, s2_kept_blocks

    n = math.ceil(S / block)
    s2 = s2_kept_blocks(n, heads, S2Options(block=block, local_blocks=16, vert_stride=8))
    return {
        "dense": SparsePattern(block, torch.ones(heads, n, n, dtype=torch.bool).tril()),
        "s2": SparsePattern(block, s2),
        "sliding_window": sink_window_pattern(n, block, heads, torch.ones(heads, dtype=torch.bool), 128, 4096),
    }


def flop_ratio(pattern) -> float:
    """Dense causal blocks over kept causal blocks (diagonal blocks count half)."""
    n = pattern.block_mask_HQN.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    kept = pattern.block_mask_HQN.cpu() & causal
    diag = kept.diagonal(dim1=1, dim2=2).sum()
    dense = pattern.n_heads * (n * (n - 1) / 2 + n / 2)
    return float(dense / (kept.sum() - diag + diag / 2))


def timed(fn: Callable[[], object], reps: int, backward: bool) -> float:
    """Median milliseconds of ``fn`` (plus backward of its output when asked)."""
    def step():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        if backward:
            out.backward(torch.ones_like(out))

    step()  # warm-up / compile
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def dense_baseline(q, k, v) -> tuple[str, Callable]:
    """flash-attn when installed, else SDPA (flash backend on CUDA); layout (B, H, S, D) in and out."""
    try:
        from flash_attn import flash_attn_func

        return "flash_attn", lambda: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     causal=True).transpose(1, 2)
    except ImportError:
        import torch.nn.functional as F

        gqa = k.shape[1] != q.shape[1]
        return "sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def measure_length(S: int, dtype: torch.dtype, reps: int, heads: int, head_dim: int, block: int) -> list[dict]:
    """All records at one sequence length."""
    from longshard.kernels.block_sparse.flex import block_sparse_attention_flex
    from longshard.kernels.block_sparse.triton import block_sparse_attention_triton
    from longshard.kernels.lightning import lightning_attention_chunk
    from longshard.kernels.lightning.triton import lightning_attention_triton

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common = {"seq_len": S, "dtype": str(dtype).split(".")[-1],
              "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu-interpreter"}
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, heads, S, head_dim, device=dev, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    records = []
    base_name, base = dense_baseline(q, k, v)
    base_fwd, base_fb = timed(base, reps, False), timed(base, reps, True)
    for mask_name, pat in masks(S, block, heads).items():
        pat = pat.to(dev)
        fn = lambda p=pat: block_sparse_attention_triton(q, k, v, p)
        rec = {"kernel": "block_sparse", "mask": mask_name, **common,
               "fwd_ms": timed(fn, reps, False), "fwd_bwd_ms": timed(fn, reps, True),
               "baseline": base_name, "baseline_fwd_ms": base_fwd, "baseline_fwd_bwd_ms": base_fb,
               "flop_ratio": flop_ratio(pat)}
        rec["speedup_vs_baseline"] = base_fb / rec["fwd_bwd_ms"]
        if dev.type == "cuda":
            try:
                flex = lambda p=pat: block_sparse_attention_flex(q, k, v, p)
                rec["flex_fwd_ms"], rec["flex_fwd_bwd_ms"] = timed(flex, reps, False), timed(flex, reps, True)
            except Exception as e:  # noqa: BLE001 - report, do not hide, a baseline that fails
                rec["flex_error"] = f"{type(e).__name__}: {e}"[:200]
        records.append(rec)
        print(json.dumps(rec), flush=True)
    records.append(dma_record(q, k, v, block, reps, common, base_name, base_fwd, base_fb))
    # lightning: feature dim = value dim = head_dim, per-head decays as in our linear attention
    log_decay = torch.linspace(0.5, 0.01, heads, device=dev)
    tri = lambda: lightning_attention_triton(q, k, v, log_decay, None, 64)[0]
    ref = lambda: lightning_attention_chunk(q, k, v, log_decay, None, 64)[0]
    rec = {"kernel": "lightning", "mask": "causal_decay", **common,
           "fwd_ms": timed(tri, reps, False), "fwd_bwd_ms": timed(tri, reps, True),
           "baseline": "lightning_chunk_pytorch", "baseline_fwd_ms": timed(ref, reps, False),
           "baseline_fwd_bwd_ms": timed(ref, reps, True), "flop_ratio": 1.0}
    rec["speedup_vs_baseline"] = rec["baseline_fwd_bwd_ms"] / rec["fwd_bwd_ms"]
    records.append(rec)
    print(json.dumps(rec), flush=True)
    return records


def dma_record(q, k, v, block: int, reps: int, common: dict, base_name: str, base_fwd: float,
               base_fb: float) -> dict:
    """DMA through the Triton kernel vs the dense baseline, and its gather path (where it fits in time)."""
    from longshard.kernels.dma import dma_attention_gather, dma_attention_triton, dma_kept_fraction

    S, heads, head_dim = q.shape[2], q.shape[1], q.shape[3]
    a = torch.full((heads,), 0.5, device=q.device, requires_grad=True)
    delta = (torch.randn(heads, head_dim, device=q.device) * 0.02).requires_grad_()
    keep = min(DMA_KEEP, math.ceil(S / block))
    tri = lambda: dma_attention_triton(q, k, v, a, delta, block, keep, head_dim ** -0.5)
    rec = {"kernel": "dma", "mask": f"dma_keep{keep}", **common,
           "fwd_ms": timed(tri, reps, False), "fwd_bwd_ms": timed(tri, reps, True),
           "baseline": base_name, "baseline_fwd_ms": base_fwd, "baseline_fwd_bwd_ms": base_fb,
           "flop_ratio": 1.0 / dma_kept_fraction(S, block, keep)}
    rec["speedup_vs_baseline"] = base_fb / rec["fwd_bwd_ms"]
    if S <= 32768:  # the PyTorch gather path: the reference speed of the same selection
        gat = lambda: dma_attention_gather(q, k, v, a, delta, block, keep, head_dim ** -0.5)
        rec["gather_fwd_ms"], rec["gather_fwd_bwd_ms"] = timed(gat, reps, False), timed(gat, reps, True)
    print(json.dumps(rec), flush=True)
    return rec


def _pair_ms(ops, q, k, v, causal: bool, reps: int) -> tuple[float, float]:
    """Median ms of a pair's forward and of its backward from (here: its own) merged statistics."""
    o, lse = ops.forward(q, k, v, causal)
    do = torch.randn_like(o).to(q.dtype)
    delta = (do.float() * o.to(q.dtype).float()).sum(-1)
    fwd = timed(lambda: ops.forward(q, k, v, causal), reps, False)
    bwd = timed(lambda: ops.backward(do, q, k, v, o.to(q.dtype), lse, delta, causal), reps, False)
    return fwd, bwd


def ring_pair_records(S: int, dtype: torch.dtype, reps: int, heads: int, head_dim: int) -> list[dict]:
    """One ring step of an 8-rank zigzag ring at length ``S`` (a chunk of S / 16 queries against a visible
    and against its own, causal, key chunk): flash-attn's forward/backward with the log-sum-exp against
    the Triton pair kernel, forward and forward + backward (from merged statistics) in ms. Empty when
    flash-attn or a GPU is missing."""
    from longshard.kernels.attention.flash_pairs import FlashAttnPairs, flash_attn_installed
    from longshard.kernels.attention.pairs import TritonPairs

    if not (torch.cuda.is_available() and flash_attn_installed()) or dtype not in (torch.float16, torch.bfloat16):
        return []
    n, scale = S // 16, head_dim ** -0.5
    q = torch.randn(1, heads, n, head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, max(1, heads // 4), n, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    out = []
    for causal in (False, True):
        rec = {"kernel": "ring_pair", "seq_len": S, "chunk": n, "causal": causal, "dtype": str(dtype)}
        for name, ops in (("flash_attn", FlashAttnPairs(scale, TritonPairs(scale))), ("triton", TritonPairs(scale))):
            rec[f"{name}_fwd_ms"], rec[f"{name}_bwd_ms"] = _pair_ms(ops, q, k, v, causal, reps)
        rec["flash_vs_triton_fwd_bwd"] = ((rec["triton_fwd_ms"] + rec["triton_bwd_ms"])
                                          / (rec["flash_attn_fwd_ms"] + rec["flash_attn_bwd_ms"]))
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def run(lengths: list[int], dtype: torch.dtype, reps: int, heads: int, head_dim: int, block: int) -> list[dict]:
    return [r for S in lengths for r in (*measure_length(S, dtype, reps, heads, head_dim, block),
                                         *ring_pair_records(S, dtype, reps, heads, head_dim))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the records to this file")
    ap.add_argument("--quick", action="store_true", help="8K and 32K only")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1 (checks the script)")
    ap.add_argument("--lengths", type=int, nargs="*", help="sequence lengths (default 8K..128K)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    if args.smoke:
        records = run(args.lengths or [96], torch.float32, 1, heads=2, head_dim=16, block=16)
    elif not torch.cuda.is_available():
        print("benchmarks/kernels.py measures CUDA kernels; no GPU here (use --smoke to check the script)",
              file=sys.stderr)
        return 2
    else:
        lengths = args.lengths or ([8192, 32768] if args.quick else [8192, 16384, 32768, 65536, 131072])
        records = run(lengths, getattr(torch, args.dtype), 5, H, D, BLOCK)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
