"""Decoding with the KV cache in host memory: tokens/s and bytes per step vs context length.

Modes (same NOSA model weights, same block budget):

- ``full``: every past key/value on the compute device (``InferenceCache``); no transfers.
- ``offload_no_locality``: KV in host memory, all far blocks chosen query-aware
  (``locality=False``), device cache of ``n_slots + 4`` blocks per KV head.
- ``offload_nosa``: KV in host memory, NOSA's query-agnostic + query-aware selection.

The importance score is set to random values (a trained model's score is not flat), the
prompt is random tokens, decoding is greedy. ``bytes_per_step`` = host->device bytes per decoding
step over all layers (block fetches); ``cache_hit_rate`` = listed blocks found on the device.
On a CPU-only machine the "device" is host memory too: transfers are real copies, counted, and
the times show the bookkeeping cost, not PCIe.

    python benchmarks/offload_decode.py --quick --json offload_decode.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from longshard.models import InferenceCache, ModelConfig, Transformer
from longshard.models.offload import OffloadedCache, generate

NOSA = {"block": 64, "sink_blocks": 1, "local_blocks": 2, "query_blocks": 4, "static_blocks": 4}


def build(locality: bool, context: int, device: torch.device, dim: int, layers: int) -> Transformer:
    torch.manual_seed(0)
    attention = [{"name": "nosa", "options": dict(NOSA, locality=locality)}]
    cfg = ModelConfig(vocab_size=256, dim=dim, n_layers=layers, n_heads=dim // 32, n_kv_heads=max(dim // 128, 1),
                      max_seq_len=context + 1024, attention=attention)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if hasattr(m, "importance_w"):
                m.importance_w.copy_(torch.randn(m.importance_w.shape, generator=g))
    return model.to(device)


def run(mode: str, context: int, new_tokens: int, device: torch.device, dim: int, layers: int) -> dict:
    model = build(mode != "offload_no_locality", context, device, dim, layers)
    n_slots = NOSA["sink_blocks"] + NOSA["local_blocks"] + NOSA["query_blocks"] + NOSA["static_blocks"]
    cache = InferenceCache() if mode == "full" else OffloadedCache(cache_blocks=n_slots + 4)
    prompt = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        model(prompt[:, :-1], cache=cache)  # prefill (not timed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, prompt[:, -1:], new_tokens + 1, cache=cache)  # new_tokens + 1 decoding forwards
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    steps = new_tokens + 1
    rec = {"mode": mode, "context_len": context, "tokens_per_s": steps / dt, "bytes_per_step": 0.0,
           "cache_hit_rate": None, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if isinstance(cache, OffloadedCache):
        rec["bytes_per_step"] = cache.stats.h2d_bytes / cache.stats.decode_steps
        rec["cache_hit_rate"] = cache.stats.hit_rate
        rec["device_kv_bytes"] = cache.device_kv_bytes()
        rec["host_kv_bytes"] = cache.host_bytes()
    return rec


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="2K/4K/8K, 32 tokens, dim 256 (minutes on 2 CPU cores)")
    p.add_argument("--json", default=None, help="write the records here")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.new_tokens, args.dim = [2048, 4096, 8192], 32, 256
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = []
    print(f"{'mode':<22}{'context':>9}{'tok/s':>10}{'bytes/step':>13}{'hit rate':>10}{'vs full':>9}")
    for context in args.lengths:
        base = None
        for mode in ("full", "offload_no_locality", "offload_nosa"):
            rec = run(mode, context, args.new_tokens, device, args.dim, args.layers)
            base = rec["tokens_per_s"] if mode == "full" else base
            records.append(rec)
            print(f"{mode:<22}{context:>9}{rec['tokens_per_s']:>10.1f}{rec['bytes_per_step']:>13,.0f}"
                  f"{_rate(rec['cache_hit_rate']):>10}{rec['tokens_per_s'] / base:>9.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
