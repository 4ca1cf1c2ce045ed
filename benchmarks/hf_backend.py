"""A transformers Qwen2 model with ``attn_implementation="longshard"`` (dense, S2) against the same model
with ``sdpa``: training-step time and bytes saved for backward, at the given lengths, in one run.

The model has Qwen2.5-0.5B's attention layout (14 query / 2 KV heads of 64, hidden 896, MLP 4864) with
``--layers`` layers and a 32K vocabulary; one sequence per step, fp32 (or ``--bf16`` autocast);
a step is forward, backward and an SGD update; the time is the median of ``--repeats`` steps after
one warm-up. Saved bytes: every distinct tensor autograd saves during the forward
(``saved_tensors_hooks``), the whole model.

    python benchmarks/hf_backend.py --lengths 1024 4096 --json hf_backend.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# this folder's kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def build(attn: str, spec: dict | None, layers: int):
    import longshard.models.hf_attention  # noqa: F401  (registers "longshard")
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   use_sliding_window=False, tie_word_embeddings=True)
    if spec is not None:
        cfg.longshard_attention = spec
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.set_attn_implementation(attn)
    return model.train()


def saved_bytes(model, tokens, dtype) -> int:
    seen: dict = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        model(tokens, labels=tokens, use_cache=False)
    return sum(seen.values())


def step_time(model, tokens, dtype, repeats: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            loss = model(tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.bf16 else None
    runs = {"sdpa": ("sdpa", None), "longshard dense": ("longshard", {"name": "dense"}),
            "longshard s2": ("longshard", {"name": "s2"})}  # S2 defaults: block 64, 16 local blocks, stride 8
    rows = []
    for S in args.lengths:
        tokens = torch.randint(0, 32000, (1, S), generator=torch.Generator().manual_seed(0))
        base = None
        for name, (attn, spec) in runs.items():
            model = build(attn, spec, args.layers)
            t = step_time(model, tokens, dtype, args.repeats)
            b = saved_bytes(model, tokens, dtype)
            base = base or (t, b)
            rows.append({"seq_len": S, "run": name, "step_s": round(t, 3), "step_vs_sdpa": round(t / base[0], 3),
                         "saved_MB": round(b / 2**20, 1), "saved_vs_sdpa": round(b / base[1], 3),
                         "saved_bytes_per_token": round(b / S)})
            print(json.dumps(rows[-1]), flush=True)
            del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": "bf16" if dtype else "fp32", "layers": args.layers, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
