"""Sequence-parallel communication per attention layer: measured bytes vs the analytic volume.

Launches P gloo (CPU) or NCCL (GPU) processes per configuration; each runs one dense attention
layer forward+backward under Ulysses or ring and reports the bytes its communication counter saw
and the wall time. Analytic volumes per rank (fp32, local length L = S/P, B = 1):

- ulysses, forward: 4 all-to-alls (q, k, v, o), each sending (P-1)/P of the local tensor
  -> (P-1)/P * L * D * (2H + 2Hkv') * 4 bytes (Hkv' = max(Hkv, P)); autograd's backward
  all-to-alls are not counted by the counter.
- ring, forward + backward: K and V hop P-1 times forward and P-1 times backward, dK and dV
  P times -> (4(P-1) + 2P) * L * Hkv * D * 4 bytes (the "dense ring" reference).
- sparse_ring (s2, sliding_window): each rank sends the (KV head, key block) pairs its peers read
  and, in the backward, the gradients of the pairs it read; the analytic count comes from the
  exchange plan (``SparseExchangeAttention.analytic_bytes``), reported for rank 0.
- linear (state passing, LASP-style), forward: one all-gather of each rank's final D x D state per
  head and segment (1 contiguous segment under ulysses, 2 zigzag chunks under ring)
  -> (P-1) * segments * H * D * D * 4 bytes, independent of S.

    python benchmarks/sp_comm.py --quick --json sp_comm.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

H, HKV, D = 8, 8, 64


def analytic(mode: str, P: int, S: int, variant: str = "dense") -> int:
    L = S // P
    if variant == "linear":
        return (P - 1) * (2 if mode == "ring" else 1) * H * D * D * 4
    if mode == "ulysses":
        return int((P - 1) / P * L * D * (2 * H + 2 * max(HKV, P)) * 4)
    return (4 * (P - 1) + 2 * P) * L * HKV * D * 4


SPARSE = {
    "s2": {"block": 64, "local_blocks": 4, "vert_stride": 8, "path": "naive"},
    "sliding_window": {"block": 64, "window": 256, "path": "naive"},
}


def worker(mode: str, S: int, out: str, variant: str = "dense") -> None:
    import torch
    import torch.distributed as dist
    from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
    from longshard.parallel.layout import CommCounter, zigzag_positions
    from longshard.parallel.linear_state import LinearStateParallel
    from longshard.parallel.ring import RingAttention
    from longshard.parallel.sparse_exchange import SparseExchangeAttention
    from longshard.parallel.ulysses import UlyssesAttention

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    dev = torch.device("cuda", r) if torch.cuda.is_available() else torch.device("cpu")
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=HKV, head_dim=D)
    packed = variant == "dense_packed"  # dense over 8 packed documents (document mask)
    opts = SPARSE.get(variant, {"backend": "sdpa"} if variant.startswith("dense") else {"chunk": 64})
    core = build_attention("dense" if packed else variant, opts, ctx)
    counter = CommCounter()
    analytic_bytes = None
    if variant == "linear":
        layer = LinearStateParallel(core, dist.group.WORLD, counter, zigzag=mode == "ring")
    elif mode == "sparse_ring":
        layer = SparseExchangeAttention(core, dist.group.WORLD, counter)
        analytic_bytes = layer.analytic_bytes(1, S, 4)
    elif mode == "ulysses":
        core.set_head_slice(r * H // P, (r + 1) * H // P)
        layer = UlyssesAttention(core, dist.group.WORLD, 1, counter)
    else:
        layer = RingAttention(core, dist.group.WORLD, counter)
    L = S // P
    q, k, v = (torch.randn(1, h, L, D, device=dev, requires_grad=True) for h in (H, HKV, HKV))
    batch = AttentionBatch()
    if packed:  # this rank's positions (zigzag under ring, contiguous under Ulysses) -> document ids
        pos = zigzag_positions(r, P, L, dev) if mode == "ring" else torch.arange(r * L, (r + 1) * L, device=dev)
        batch = AttentionBatch(doc_ids_BS=(pos // (S // 8))[None])
    layer(q, k, v, batch).sum().backward()  # warm-up
    counter.reset()
    dist.barrier()
    t0 = time.perf_counter()
    layer(q, k, v, batch).sum().backward()
    dist.barrier()
    wall = time.perf_counter() - t0
    if r == 0:
        with open(out, "w") as f:
            json.dump({"bytes": sum(counter.bytes.values()), "wall_s": wall, "analytic": analytic_bytes}, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="P in {2, 4}, S in {1024, 4096} (a few minutes)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2], args.worker[3])
        return 0
    sps = [2, 4]
    lengths = [1024, 4096] if args.quick else [1024, 4096, 16384]
    records = []
    sys.stdout.write(f"{'mode':12s} {'variant':15s} {'sp':>3s} {'S':>6s} {'bytes/rank':>12s} {'analytic':>12s} "
                     f"{'dense ring':>12s} {'wall s':>8s}\n")
    for P in sps:
        for S in lengths:
            runs = [("ulysses", "dense"), ("ring", "dense"), ("ulysses", "dense_packed"), ("ring", "dense_packed"),
                    ("ulysses", "linear"), ("ring", "linear")]
            if S <= 8192:  # the sparse exchange attends with the naive masked softmax on CPU
                runs += [("sparse_ring", "s2"), ("sparse_ring", "sliding_window")]
            for mode, variant in runs:
                with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
                    path = tmp.name
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={P}",
                       __file__, "--worker", mode, str(S), path, variant]
                subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                with open(path) as f:
                    res = json.load(f)
                os.unlink(path)
                rec = {"mode": mode, "variant": variant, "sp": P, "seq_len": S, "bytes_per_rank": res["bytes"],
                       "analytic_bytes_per_rank": res["analytic"] if mode == "sparse_ring"
                       else analytic(mode, P, S, variant),
                       "dense_ring_bytes_per_rank": analytic("ring", P, S), "wall_s": res["wall_s"]}
                records.append(rec)
                sys.stdout.write(f"{mode:12s} {variant:15s} {P:3d} {S:6d} {rec['bytes_per_rank']:12d} "
                                 f"{rec['analytic_bytes_per_rank']:12d} {rec['dense_ring_bytes_per_rank']:12d} "
                                 f"{rec['wall_s']:8.3f}\n")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
