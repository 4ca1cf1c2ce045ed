"""Tokens/s and MFU of a training step (forward, backward, AdamW), per attention variant, and each
variant's step time as a ratio to dense in the same run.

A ~1B-parameter Llama-style model (dim 2048, 16 layers, 16 / 8 heads, head dim 128, FFN 5632,
vocab 32,000) at each sequence length, batch 1, one packed-free sequence, bf16 autocast with
fp32 master weights, the chunked loss head, activation checkpointing off. MFU = model FLOPs per
token (6 x matmul parameters + 3 x the attention FLOPs each variant declares) x tokens/s / peak
(``train.metrics.peak_tflops``). ``ring1`` rows wrap the dense layers in the ring form over a
1-process group: the context-parallel code path's overhead at sp = 1, against the dense row of
the same run.

``--shape tiny_lm`` is the tiny_lm recipe's model (4 layers, dim 192, 6 / 2 heads, vocab 320) with
``--batch`` sequences per step (16 there) and every registered variant at its defaults (S2 with a
stride its 6 heads cover; ``gated``: dense with element-wise output gates); ``--dtype fp32`` runs
without autocast (the recipe's dtype).

    python benchmarks/train_step.py --lengths 8192 32768 --json step.json      # GPU
    python benchmarks/train_step.py --shape tiny_lm --batch 16 --dtype fp32 --lengths 256 1024 --steps 3
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
TINY_LM = {"vocab_size": 320, "dim": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 2}
# every variant at its defaults (S2: a stride its 6 heads cover), the trainable ones of issue 37 included
ALL_VARIANTS = {
    **{v: [{"name": v}] for v in ("dense", "moh", "dma", "nsa", "nosa", "power", "sliding_window", "streaming",
                                  "streaming_gated", "linear")},
    "s2": [{"name": "s2", "options": {"block": 64, "local_blocks": 2, "vert_stride": 6}}],
    "gated": [{"name": "dense", "gate": "elementwise"}],
}
SHAPES = {"big": (BIG, VARIANTS), "tiny_lm": (TINY_LM, ALL_VARIANTS)}


def _ring1(model):
    """Dense cores in the ring form over a 1-process gloo/NCCL group."""
    import torch.distributed as dist
    from longshard.parallel.ring import apply_ring

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    return apply_ring(model, dist.group.WORLD)


def measure(variant: str, S: int, sizes: dict, device: torch.device, steps: int, table: dict = VARIANTS,
            batch: int = 1, dtype: torch.dtype | None = torch.bfloat16) -> dict:
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
    tokens = torch.randint(0, cfg.vocab_size, (batch, S + 1), device=device)
    pos = torch.arange(S, device=device)[None].expand(batch, S)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(tokens[:, :-1], labels_BS=tokens[:, 1:], position_ids_BS=pos)
        aux = model.aux_loss()
        ((out.loss_sum / out.n_tokens) + (aux if aux is not None else 0.0)).backward()
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
    tps = batch * S / wall
    peak = peak_tflops(device, None)
    return {"variant": variant, "seq_len": S, "params": sum(p.numel() for p in model.parameters()),
            "step_s": wall, "tokens_per_s": tps, "tflops": fpt * tps / 1e12,
            "mfu": fpt * tps / (peak * 1e12) if peak else None,
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def _median_round(samples: list[dict]) -> dict:
    """The round with the median step time (an error if any round failed); ``step_s_rounds`` lists all."""
    bad = [r for r in samples if "error" in r]
    if bad:
        return bad[0]
    ordered = sorted(samples, key=lambda r: r["step_s"])
    rec = dict(ordered[(len(ordered) - 1) // 2])
    rec["step_s_rounds"] = [r["step_s"] for r in samples]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--shape", default="big", choices=list(SHAPES), help="model: ~1B (big) or the tiny_lm recipe's")
    ap.add_argument("--variants", nargs="+", default=None, choices=sorted({*VARIANTS, *ALL_VARIANTS}),
                    help="default: every variant of the shape")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="bf16 autocast or plain fp32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the variant list this many times, interleaved, each round starting one variant "
                         "later (no variant always first); each variant's step time is the median over rounds")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    sizes, table = SHAPES[args.shape]
    sizes, lengths, table = (TINY, [128], TINY_VARIANTS) if args.cpu_smoke else (sizes, args.lengths, table)
    variants = args.variants or list(table)
    unknown = [v for v in variants if v not in table]
    if unknown:
        ap.error(f"--shape {args.shape} has no variant {', '.join(unknown)}: {', '.join(table)}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    rows = []
    print(f"{'variant':8s} {'S':>7s} {'step s':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for S in lengths:
        samples: dict[str, list[dict]] = {v: [] for v in variants}
        for i in range(max(1, args.rounds)):  # round-robin: a slow spell of the machine hits every variant;
            for v in variants[i % len(variants):] + variants[: i % len(variants)]:  # each round starts elsewhere
                try:
                    rec = measure(v, S, sizes, device, 1 if args.cpu_smoke else args.steps, table, args.batch, dtype)
                except torch.cuda.OutOfMemoryError as e:  # a length the variant cannot hold: say so, go on
                    rec = {"variant": v, "seq_len": S, "error": f"out of memory: {str(e)[:200]}"}
                    torch.cuda.empty_cache()
                samples[v].append(rec)
        for v in variants:
            rec = _median_round(samples[v])
            rows.append(rec)
            if "error" in rec:
                print(f"{v:8s} {S:7d} {rec['error'][:60]}")
                continue
            mfu = f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "-"
            print(f"{v:8s} {S:7d} {rec['step_s']:8.3f} {rec['tokens_per_s']:10.0f} {rec['tflops']:8.1f} {mfu:>6s}")
    dense = {r["seq_len"]: r for r in rows if r["variant"] == "dense" and "error" not in r}
    for r in rows:  # the step time of each variant against dense's in this run
        if "error" not in r and r["seq_len"] in dense:
            r["step_vs_dense"] = r["step_s"] / dense[r["seq_len"]]["step_s"]
    print("step time / dense: " + "; ".join(f"{r['variant']}@{r['seq_len']} {r['step_vs_dense']:.2f}x"
                                          for r in rows if "step_vs_dense" in r))
    for r in rows:
        if r["variant"] == "ring1" and "error" not in r and r["seq_len"] in dense:
            r["overhead_vs_dense"] = r["step_s"] / dense[r["seq_len"]]["step_s"] - 1
            print(f"ring sp=1 overhead at {r['seq_len']}: {r['overhead_vs_dense']:+.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
