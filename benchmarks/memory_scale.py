"""Memory scaling of the attention paths: saved-for-backward bytes per token and the step's peak.

For each path (dense, dense with packed documents, s2, sliding window, linear) and length, one
1-layer model (8 heads / 2 KV heads, head dim 64) runs forward + backward on CPU; it reports the
bytes the core attention saves for backward per token (saved_tensors_hooks) and the peak of live
tensor storage over the whole step (``TensorMemoryTracker``). Flat bytes/token = memory linear in S.

    python benchmarks/memory_scale.py --json memory_scale.json [--lengths 2048 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import json

import torch
from longshard.models import ModelConfig, Transformer
from longshard.train.memory import TensorMemoryTracker, saved_attention_bytes

PATHS = {
    "dense": [{"name": "dense"}],
    "dense_packed": [{"name": "dense"}],
    "s2": [{"name": "s2", "options": {"block": 64, "local_blocks": 4, "vert_stride": 8,
                                      "allow_incomplete_coverage": True}}],
    "sliding_window": [{"name": "sliding_window", "options": {"block": 64, "window": 256}}],
    "linear": [{"name": "linear", "options": {"chunk": 64}}],
}


def measure(path: str, S: int, dtype: torch.dtype | None) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, dim=512, n_layers=1, n_heads=8, n_kv_heads=2, max_seq_len=S,
                                    attention=PATHS[path]))
    tokens = torch.randint(0, 256, (1, S))
    doc = torch.arange(S)[None] // 1024 if path == "dense_packed" else None  # 1K-token documents
    saved = saved_attention_bytes(model, tokens, doc, dtype)
    with TensorMemoryTracker() as mem:
        for p in model.parameters():
            mem.track(p)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(tokens, doc_ids_BS=doc, labels_BS=tokens)
        out.loss_sum.backward()
    return {"path": path, "sp_mode": "none", "seq_len": S, "dtype": "bf16" if dtype else "fp32",
            "saved_bytes_per_token": saved / S, "peak_bytes": mem.peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--paths", nargs="+", default=sorted(PATHS))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.bf16 else None
    rows = []
    print(f"{'path':16s} {'S':>7s} {'saved B/token':>14s} {'peak MB':>9s}")
    for path in args.paths:
        for S in args.lengths:
            rec = measure(path, S, dtype)
            rows.append(rec)
            print(f"{path:16s} {S:7d} {rec['saved_bytes_per_token']:14.0f} {rec['peak_bytes'] / 2**20:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
