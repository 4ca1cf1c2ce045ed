"""Tokens/s and MFU of a bf16 training step (forward, backward, fused AdamW), per attention variant.

A ~1B-parameter Llama-style model (dim 2048, 16 layers, 16 / 8 heads, head dim 128, FFN 5632,
vocab 32,000) at each sequence length, batch 1, one packed-free sequence, bf16 autocast with
fp32 master weights, the chunked loss head, activation checkpointing off. MFU = model FLOPs per
token (6 x matmul parameters + 3 x the attention FLOPs each variant declares) x tokens/s / peak
(``train.metrics.peak_tflops``). ``ring1`` rows wrap the dense layers in the ring form over a
1-process group: the context-parallel code path's overhead at sp = 1, against the dense row of
the same run.

    python benchmarks/train_step.py --lengths 8192 32768 --json step.json      # GPU
    python benchmarks/train_step.py --cpu-smoke                                 # tiny, checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

VARIANTS = {
    "dense": [{"name": "dense"}],
    "s2": [{"name": "s2", "options": {"block": 64, "local_blocks": 16, "vert_stride": 8}}],
    "linear": [{"name": "linear", "options": {"chunk": 64}}],
    "ring1": [{"name": "dense"}],
}
BIG = {"vocab_size": 32000, "dim": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 8, "ffn_hidden_dim": 5632}
TINY = {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden_dim": 128}
TINY_VARIANTS = {**VARIANTS, "s2": [{"name": "s2", "options": {"block": 16, "local_blocks": 2, "vert_stride": 2}}],
                 "linear": [{"name": "linear", "options": {"chunk": 16}}]}


def _ring1(model):
    """Dense cores in the ring form over a 1-process gloo/NCCL group."""
    import torch.distributed as dist
    from longshard.parallel.ring import apply_ring

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    return apply_ring(model, dist.group.WORLD)


def measure(variant: str, S: int, sizes: dict, device: torch.device, steps: int, table: dict = VARIANTS) -> dict:
    from longshard.models import ModelConfig, Transformer
    from longshard.train.metrics import flops_per_token, peak_tflops

    torch.manual_seed(0)
    cfg = ModelConfig(**sizes, max_seq_len=S, attention=table[variant])
    model = Transformer(cfg).to(device)
    fpt = flops_per_token(cfg, S, model)
    if variant == "ring1":
        model = _ring1(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda",
                            foreach=device.type != "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (1, S + 1), device=device)
    pos = torch.arange(S, device=device)[None]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(tokens[:, :-1], labels_BS=tokens[:, 1:], position_ids_BS=pos)
        (out.loss_sum / out.n_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up: kernel compilation, allocator
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - t0) / steps
    tps = S / wall
    peak = peak_tflops(device, None)
    return {"variant": variant, "seq_len": S, "params": sum(p.numel() for p in model.parameters()),
            "step_s": wall, "tokens_per_s": tps, "tflops": fpt * tps / 1e12,
            "mfu": fpt * tps / (peak * 1e12) if peak else None,
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    sizes, lengths = (TINY, [128]) if args.cpu_smoke else (BIG, args.lengths)
    rows = []
    print(f"{'variant':8s} {'S':>7s} {'step s':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for S in lengths:
        for v in args.variants:
            try:
                rec = measure(v, S, sizes, device, 1 if args.cpu_smoke else args.steps,
                              TINY_VARIANTS if args.cpu_smoke else VARIANTS)
            except torch.cuda.OutOfMemoryError as e:  # a length the variant cannot hold: say so, go on
                rec = {"variant": v, "seq_len": S, "error": f"out of memory: {str(e)[:200]}"}
                torch.cuda.empty_cache()
            rows.append(rec)
            if "error" in rec:
                print(f"{v:8s} {S:7d} {rec['error'][:60]}")
                continue
            mfu = f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "-"
            print(f"{v:8s} {S:7d} {rec['step_s']:8.3f} {rec['tokens_per_s']:10.0f} {rec['tflops']:8.1f} {mfu:>6s}")
    dense = {r["seq_len"]: r for r in rows if r["variant"] == "dense" and "error" not in r}
    for r in rows:
        if r["variant"] == "ring1" and "error" not in r and r["seq_len"] in dense:
            r["overhead_vs_dense"] = r["step_s"] / dense[r["seq_len"]]["step_s"] - 1
            print(f"ring sp=1 overhead at {r['seq_len']}: {r['overhead_vs_dense']:+.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
