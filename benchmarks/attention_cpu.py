"""Forward+backward time and peak memory of each attention variant vs dense SDPA, on CPU.

Every (variant, length) runs in a fresh process so its peak resident memory can be read; times are
the median of a few repetitions after a warm-up. Ratios are against SDPA measured in the same run.

    python benchmarks/attention_cpu.py --quick --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import sys
import time

import torch

H, KV, D = 8, 8, 64

NOSA = {"block": 64, "sink_blocks": 1, "local_blocks": 2, "query_blocks": 4, "static_blocks": 4}
VARIANTS = {
    "s2": ("s2", {"block": 64, "local_blocks": 16, "vert_stride": 8, "path": "chunked"}),
    "s2_banded": ("s2", {"block": 64, "local_blocks": 16, "vert_stride": 8, "path": "banded"}),
    "s2_gather": ("s2", {"block": 64, "local_blocks": 16, "vert_stride": 8, "path": "gather"}),
    "streaming": ("streaming", {"sink": 128, "window": 256, "retrieval_heads": [0, 1], "path": "chunked"}),
    "sliding_window": ("sliding_window", {"window": 512, "path": "chunked"}),
    "nosa": ("nosa", dict(NOSA, path="gather")),
    "nsa": ("nsa", {"path": "gather"}),
    "linear": ("linear", {"chunk": 64}),
    # PowerAttention at a sliding window's local width (8 blocks of 64 = 512 tokens) plus its log2 blocks
    "power": ("power", {"block": 64, "local_blocks": 8, "path": "fused"}),
    "power_gather": ("power", {"block": 64, "local_blocks": 8, "path": "gather"}),
    "power_naive": ("power", {"block": 64, "local_blocks": 8, "path": "naive"}),
    # DMA with the same 8-block budget per query block (8 x 64 = 512 keys)
    "dma": ("dma", {"block": 64, "keep_blocks": 8, "path": "gather"}),
    "dma_naive": ("dma", {"block": 64, "keep_blocks": 8, "path": "naive"}),
    # MoH over the 8 heads: every head active, half of them, a quarter (shared + routed top-k per token)
    "moh_8of8": ("moh", {"shared_heads": 2, "top_k": 6, "path": "routed"}),
    "moh_4of8": ("moh", {"shared_heads": 2, "top_k": 2, "path": "routed"}),
    "moh_2of8": ("moh", {"shared_heads": 1, "top_k": 1, "path": "routed"}),
}


def variant_pairs(name: str, opts: dict, S: int) -> float:
    """Query-key pairs (summed over heads) the variant needs; dense causal = H * S(S+1)/2."""
    t = torch.arange(S, dtype=torch.float64)
    if name.startswith("s2"):
        from longshard.models.attention.s2 import S2Options, s2_kept_blocks

        o = S2Options(**{k: v for k, v in opts.items() if k != "path"})
        n = math.ceil(S / o.block)
        kept = s2_kept_blocks(n, KV, o).double()
        diag = kept.diagonal(dim1=1, dim2=2).sum() * o.block * (o.block + 1) / 2
        off = (kept.sum() - kept.diagonal(dim1=1, dim2=2).sum()) * o.block**2
        return float((diag + off) * (H // KV))
    if name.startswith("power"):
        from longshard.models.attention.power import PowerOptions, power_block_mask

        o = PowerOptions(**{k: v for k, v in opts.items() if k != "path"})
        n = math.ceil(S / o.block)
        kept = power_block_mask(n, o).double()
        diag = n * o.block * (o.block + 1) / 2
        return float((diag + (kept.sum() - n) * o.block**2) * H)
    if name.startswith("dma"):
        from longshard.kernels.dma import dma_kept_fraction

        return H * S * (S + 1) / 2 * dma_kept_fraction(S, opts["block"], opts["keep_blocks"])
    if name.startswith("moh"):
        return (opts["shared_heads"] + opts["top_k"]) * S * (S + 1) / 2
    if name in ("streaming", "sliding_window"):
        w, sink = opts["window"], opts.get("sink", 0)
        per_stream = torch.minimum(t + 1, torch.full_like(t, w + sink)).sum()
        n_full = len(opts.get("retrieval_heads", [])) * (H // KV)
        return float(n_full * (t + 1).sum() + (H - n_full) * per_stream)
    if name == "nsa":
        cmp_ = torch.floor(t / 16).clamp_min(0)
        sel = torch.minimum(t + 1, torch.full_like(t, 16 * 64))
        win = torch.minimum(t + 1, torch.full_like(t, 512))
        return float(H * (cmp_ + sel + win).sum())
    if name == "nosa":  # sinks + local + far blocks, causal
        n_blocks = opts["sink_blocks"] + opts["local_blocks"] + opts["query_blocks"] + opts["static_blocks"]
        return float(H * torch.minimum(t + 1, torch.full_like(t, n_blocks * opts["block"])).sum())
    if name == "linear":  # chunk form: C x C intra + D x D inter and state update per chunk, in pair units
        C = opts["chunk"]
        return float(H * S * (C / 2 + 2 * D))
    raise KeyError(name)


def _measure(conn, name: str, S: int, reps: int) -> None:
    torch.set_num_threads(2)
    from longshard.models.attention import AttentionBatch, AttentionContext, build_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, S, D, generator=g, requires_grad=True)
    k = torch.randn(1, KV, S, D, generator=g, requires_grad=True)
    v = torch.randn(1, KV, S, D, generator=g, requires_grad=True)
    ctx = AttentionContext(layer_idx=0, n_layers=2, n_heads=H, n_kv_heads=KV, head_dim=D, model_dim=H * D)
    if name == "sdpa":
        mod = build_attention("dense", {"backend": "sdpa"}, ctx)
    else:
        mod = build_attention(*VARIANTS[name], ctx)
    batch = AttentionBatch(x_BSE=torch.randn(1, S, H * D, generator=g))

    def step() -> None:
        mod(q, k, v, batch).sum().backward()
        q.grad = k.grad = v.grad = None

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    conn.send((statistics.median(times), peak))


def measure(name: str, S: int, reps: int) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_measure, args=(child, name, S, reps))
    p.start()
    out = parent.recv()
    p.join()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="2K and 4K (NSA 2K only), one repetition: under 10 minutes on 2 cores")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--json", default=None, help="write the records here")
    args = ap.parse_args(argv)
    lengths = args.lengths or ([2048, 4096] if args.quick else [2048, 4096, 8192, 16384])
    reps = 1 if args.quick else 3
    records = []
    if args.quick and args.variants == list(VARIANTS):
        slow = ("s2_gather", "s2_banded", "power_gather", "power_naive", "dma_naive")
        args.variants = [v for v in VARIANTS if v not in slow]
    sys.stdout.write(f"{'variant':15s} {'S':>6s} {'fwd+bwd s':>10s} {'sdpa s':>8s} {'speedup':>8s} "
                     f"{'flop ratio':>10s} {'eff.':>5s} {'peak MB':>8s}\n")
    for S in lengths:
        sdpa_s, _ = measure("sdpa", S, reps)
        dense_pairs = H * S * (S + 1) / 2
        for name in args.variants:
            if args.quick and name == "nsa" and S > 2048:
                continue  # the NSA CPU path costs ~20 s per step at 2K already
            t, peak = measure(name, S, reps)
            ratio = dense_pairs / variant_pairs(name, VARIANTS[name][1], S)
            rec = {"variant": name, "path": VARIANTS[name][1].get("path", "chunk"), "seq_len": S, "fwd_bwd_s": t,
                   "sdpa_fwd_bwd_s": sdpa_s, "speedup_vs_sdpa": sdpa_s / t, "flop_ratio": ratio,
                   "peak_mem_bytes": peak}
            records.append(rec)
            sys.stdout.write(f"{name:15s} {S:6d} {t:10.3f} {sdpa_s:8.3f} {sdpa_s / t:8.2f} {ratio:10.2f} "
                             f"{sdpa_s / t / ratio:5.2f} {peak / 1e6:8.0f}\n")
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
