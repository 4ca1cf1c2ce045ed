"""Memory scaling of the attention paths: saved-for-backward bytes per token and the step's peak.

For each path (dense, dense with packed documents, s2, sliding window, linear) and length, one
1-layer model (8 heads / 2 KV heads, head dim 64) runs forward + backward on CPU; it reports the
bytes the core attention saves for backward per token (saved_tensors_hooks) and the peak of live
tensor storage over the whole step (``TensorMemoryTracker``). Flat bytes/token = memory linear in S.

    python benchmarks/memory_scale.py --json memory_scale.json [--lengths 2048 4096 8192 16384]

Under torchrun it measures the sequence-parallel forms instead (``--sp ulysses ring hybrid``; hybrid
needs 4 processes: Ulysses 2 x ring 2); ``seq_len`` is the whole sequence, bytes are per local
token of rank 0 (block-sparse paths under ``ring`` are the sparsity-aware exchange):

    torchrun --nproc-per-node 2 benchmarks/memory_scale.py --sp ulysses ring --json sp.json

``--qwen`` instead measures the peak of one bf16 training step (forward + backward, fp32 weights
and gradients) of a Qwen2.5-0.5B-shaped 2-layer model (hidden 896, 14 / 2 heads, FFN 4864, vocab
151,936, tied, QKV bias) with 4K-token packed documents, with the chunked loss head and, where it
fits in ``--max-gb``, the one-pass head (the logits' share is the difference):

    python benchmarks/memory_scale.py --qwen --lengths 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from longshard.models import ModelConfig, Transformer
from longshard.train.config import SP_MODES
from longshard.train.memory import TensorMemoryTracker, saved_attention_bytes

PATHS = {
    "dense": [{"name": "dense"}],
    "dense_packed": [{"name": "dense"}],
    "s2": [{"name": "s2", "options": {"block": 64, "local_blocks": 4, "vert_stride": 8,
                                      "allow_incomplete_coverage": True}}],
    "sliding_window": [{"name": "sliding_window", "options": {"block": 64, "window": 256}}],
    "linear": [{"name": "linear", "options": {"chunk": 64}}],
}


def _sequence_parallel(model: Transformer, sp_mode: str) -> tuple[Transformer, int, bool, int]:
    """``model`` made sequence-parallel over all processes: (model, rank, zigzag, ulysses size)."""
    from longshard.parallel.ring import apply_ring
    from longshard.parallel.ulysses import apply_ulysses
    from torch.distributed.device_mesh import init_device_mesh

    P = dist.get_world_size()
    if sp_mode == "ulysses":
        return apply_ulysses(model, dist.group.WORLD), dist.get_rank(), False, 1
    if sp_mode == "ring":
        return apply_ring(model, dist.group.WORLD), dist.get_rank(), True, 1
    mesh = init_device_mesh("cpu", (P // 2, 2), mesh_dim_names=("ring", "uly"))
    model = apply_ring(model, mesh["ring"].get_group(), ulysses_group=mesh["uly"].get_group())
    return model, dist.get_rank(), True, 2


def measure(path: str, S: int, dtype: torch.dtype | None, sp_mode: str = "none") -> dict:
    """One forward + backward at sequence length ``S``: saved bytes per (local) token and the peak."""
    from longshard.parallel.layout import shard_batch

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, dim=512, n_layers=1, n_heads=8, n_kv_heads=2, max_seq_len=S,
                                    attention=PATHS[path]))
    tokens = torch.randint(0, 256, (1, S))
    doc = torch.arange(S)[None] // 1024 if path == "dense_packed" else None  # 1K-token documents
    pos = None
    if sp_mode != "none":
        model, rank, zigzag, inner = _sequence_parallel(model, sp_mode)
        sh = shard_batch(tokens, tokens, doc, rank, dist.get_world_size(), zigzag=zigzag, inner=inner)
        tokens, doc, pos = sh["tokens"], sh["doc_ids"], sh["position_ids"]
    saved = saved_attention_bytes(model, tokens, doc, dtype, position_ids_BS=pos)
    with TensorMemoryTracker() as mem:
        for p in model.parameters():
            mem.track(p)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(tokens, doc_ids_BS=doc, labels_BS=tokens, position_ids_BS=pos)
        out.loss_sum.backward()
    return {"path": path, "sp_mode": sp_mode, "seq_len": S, "dtype": "bf16" if dtype else "fp32",
            "saved_bytes_per_token": saved / tokens.shape[1], "peak_bytes": mem.peak}


QWEN = {"vocab_size": 151936, "dim": 896, "n_layers": 2, "n_heads": 14, "n_kv_heads": 2, "ffn_hidden_dim": 4864,
        "qkv_bias": True, "tie_embeddings": True}


def measure_qwen(S: int, loss_chunk: int | None) -> dict:
    """Peak live tensor bytes of one bf16 step of the Qwen2.5-shaped model (see the module docstring)."""
    import time

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**QWEN, max_seq_len=S, attention=[{"name": "dense"}]))
    model.set_loss_chunking(loss_chunk)
    tokens = torch.randint(0, QWEN["vocab_size"], (1, S))
    doc = torch.arange(S)[None] // 4096
    t0 = time.perf_counter()
    with TensorMemoryTracker() as mem:
        for p in model.parameters():
            mem.track(p)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, doc_ids_BS=doc, labels_BS=tokens)
        out.loss_sum.backward()
    return {"path": "qwen2.5-0.5b-2layer", "sp_mode": "none", "seq_len": S, "dtype": "bf16",
            "loss_head": "one_pass" if loss_chunk is None else "chunked", "peak_bytes": mem.peak,
            "wall_s": time.perf_counter() - t0}


def qwen_main(lengths: list[int], max_gb: float) -> list[dict]:
    rows = []
    print(f"{'loss head':10s} {'S':>7s} {'peak GB':>9s} {'wall s':>8s}")
    for S in lengths:
        for chunk in (0, None):
            logits_gb = S * QWEN["vocab_size"] * (2 + 4 + 4) / 2**30
            if chunk is None and logits_gb > max_gb:
                print(f"{'one_pass':10s} {S:7d}  skipped: its logits alone need ~{logits_gb:.0f} GB")
                continue
            rec = measure_qwen(S, chunk)
            rows.append(rec)
            print(f"{rec['loss_head']:10s} {S:7d} {rec['peak_bytes'] / 2**30:9.2f} {rec['wall_s']:8.1f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--paths", nargs="+", default=sorted(PATHS), choices=sorted(PATHS))
    ap.add_argument("--sp", nargs="+", default=list(SP_MODES), choices=SP_MODES,
                    help="sequence-parallel modes measured under torchrun (ignored in one process)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--qwen", action="store_true", help="Qwen2.5-shaped bf16 step peaks instead")
    ap.add_argument("--max-gb", type=float, default=12.0, help="--qwen: skip one-pass heads above this")
    args = ap.parse_args()
    if args.qwen:
        rows = qwen_main(args.lengths, args.max_gb)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    dtype = torch.bfloat16 if args.bf16 else None
    modes = ["none"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        modes = [m for m in args.sp if m != "hybrid" or dist.get_world_size() % 4 == 0]
    lead = not dist.is_initialized() or dist.get_rank() == 0
    rows = []
    if lead:
        print(f"{'path':16s} {'sp_mode':8s} {'S':>7s} {'saved B/token':>14s} {'peak MB':>9s}")
    for mode in modes:
        for path in args.paths:
            for S in args.lengths:
                rec = measure(path, S, dtype, mode)
                rows.append(rec)
                if lead:
                    print(f"{path:16s} {mode:8s} {S:7d} {rec['saved_bytes_per_token']:14.0f} "
                          f"{rec['peak_bytes'] / 2**20:9.1f}")
    if args.json and lead:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
