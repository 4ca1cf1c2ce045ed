"""Why an NSA layer does (not) learn recall: its gates, and whether its selection finds the answers.

Loads a checkpoint whose model has ``nsa`` layers, runs MQAR samples at the trained length and, per NSA
layer, reports the mean gate of each branch (compressed, selected, window) at the query positions, the
share of (query, KV head) pairs whose selected blocks contain the answer's position (the value after
the queried key) -- split into answers in always-kept blocks (the first and the local ones) and answers
the content-based choice has to find -- and the compressed branch's probability on summaries that
cover the answer against what a uniform spread would give (``lift``: 1 = no preference).

    python benchmarks/nsa_trace.py runs/nsa/checkpoints/step_00000800 --samples 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def trace(ckpt: str, samples: int) -> dict:
    from longshard.cli_checkpoint import _load_checkpoint_model
    from longshard.kernels.nsa.select import compressed_attention, compressed_valid, select_blocks
    from longshard.models.attention import AttentionBatch
    from longshard.models.model import IGNORE_INDEX
    from longshard.train.data.loader import MQARDataset
    from longshard.train.data.synthetic import mqar_distances

    cfg, model = _load_checkpoint_model(ckpt, [])
    model.eval()
    layers = [(i, layer.attention.core_attention) for i, layer in enumerate(model.layers)
              if type(layer.attention.core_attention).__name__ == "NSAAttention"]
    if not layers:
        raise SystemExit(f"{ckpt}: the model has no nsa layer")
    seen: dict[int, tuple] = {}
    for i, core in layers:
        core.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args))
    S, K = cfg.train.seq_len, cfg.data.mqar_num_kv_pairs
    ds = MQARDataset(S, cfg.model.vocab_size, K, samples, 4321)
    stats = {i: {"gates": torch.zeros(3), "n": 0, "forced_hit": [0, 0], "free_hit": [0, 0], "lift": []}
             for i, _ in layers}
    for s in range(samples):
        sample = ds[s]
        with torch.no_grad():
            model(sample.tokens[None], position_ids_BS=torch.arange(S)[None])
        q_pos = (sample.labels != IGNORE_INDEX).nonzero().flatten()
        answer = q_pos - mqar_distances(sample.tokens, sample.labels, K) + 1  # the value after the key
        for i, core in layers:
            q, k, v, batch = seen[i]
            g = core.geo
            gates = torch.sigmoid(core.head_features_for(batch if isinstance(batch, AttentionBatch) else
                                                         AttentionBatch(), q.shape[1]).float())
            st = stats[i]
            st["gates"] += gates[0, :, q_pos].mean((0, 1)).cpu()
            st["n"] += 1
            ck, pk, cv, pv = core._compression()
            k_cmp, v_cmp = core.compress(k, ck, pk), core.compress(v, cv, pv)
            valid = compressed_valid(g, S, S, None, q.device)
            _, p = compressed_attention(q, k_cmp, v_cmp, valid, core.scale)  # (1, H, S, nC)
            idx, ok = select_blocks(g, p, k.shape[1], S, S)  # (1, Hkv, S, n)
            starts = torch.arange(p.shape[-1]) * g.compress_stride
            for t, a in zip(q_pos.tolist(), answer.tolist()):
                blk = a // g.select_block
                forced = blk == 0 or 0 <= t // g.select_block - blk < g.n_local
                hit = ((idx[0, :, t] == blk) & ok[0, :, t]).any(-1).float()  # per KV head
                key = "forced_hit" if forced else "free_hit"
                st[key][0] += int(hit.sum())
                st[key][1] += hit.numel()
                cover = (starts <= a) & (starts + g.compress_block > a) & valid[0, 0, t]
                n_valid = int(valid[0, 0, t].sum())
                if n_valid and cover.any():
                    uniform = float(cover.sum()) / n_valid
                    st["lift"].append(float(p[0, :, t][:, cover].sum(-1).mean()) / uniform)
    out = {}
    for i, st in stats.items():
        out[f"layer{i}"] = {
            "gate_compressed_selected_window": [round(float(x), 3) for x in st["gates"] / st["n"]],
            "answer_selected_in_forced_blocks": st["forced_hit"][0] / max(1, st["forced_hit"][1]),
            "answer_selected_by_content": st["free_hit"][0] / max(1, st["free_hit"][1]),
            "pairs_by_content": st["free_hit"][1],
            "compressed_lift_on_answer": sum(st["lift"]) / max(1, len(st["lift"])),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = trace(args.checkpoint, args.samples)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
