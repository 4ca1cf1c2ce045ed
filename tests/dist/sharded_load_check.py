"""Sharded HF loading under torchrun: each rank reads only its FSDP2 shards (peak memory measured),
the loaded shards equal the checkpoint's tensors, and the sharded model's logits equal those of the
model loaded whole.

Usage: torchrun --nproc-per-node=N sharded_load_check.py HF_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from common import TOL, finish, rel
from longshard.models.hf import config_from_hf, load_hf_model, read_hf_config
from longshard.models.model import Transformer
from longshard.parallel import exit_worker
from longshard.parallel.data_parallel import data_parallel
from longshard.parallel.env import DistEnv, build_mesh
from longshard.parallel.sharded_load import load_hf_sharded, parameters_on_meta
from safetensors import safe_open
from torch.distributed.tensor import DTensor


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> int:
    hf_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    W, r = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    failures: list[str] = []
    mcfg = config_from_hf(read_hf_config(hf_dir))
    env = DistEnv(rank=r, world_size=W, local_rank=r, device=torch.device("cpu"), backend="gloo")
    mesh = build_mesh(env)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    with parameters_on_meta():
        model = Transformer(mcfg)
    dmodel = data_parallel(model, mesh, "fsdp2")
    read = load_hf_sharded(dmodel, hf_dir, torch.device("cpu"))
    peak = (_status_kb("VmHWM") - base) * 1024
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * 4 for p in dmodel.parameters())
    full_bytes = sum(p.numel() * 4 for p in dmodel.parameters())
    # every shard equals its slice of the checkpoint (the whole tensor reassembled from the shards)
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight",
                     "norm.weight"):
            p = dict(dmodel.named_parameters())[name]
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            hf_name = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                       "layers.0.attention.wq.weight": "model.layers.0.self_attn.q_proj.weight",
                       "layers.1.feed_forward.w2.weight": "model.layers.1.mlp.down_proj.weight"}[name]
            if not torch.equal(whole, f.get_tensor(hf_name)):
                failures.append(f"{name}: sharded load differs from the checkpoint")
    tokens = torch.randint(0, mcfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = dmodel(tokens)
    record = {"world": W, "rank": r, "peak_bytes": peak, "read_bytes": read, "local_param_bytes": local,
              "full_param_bytes": full_bytes}
    if r == 0:  # the model loaded whole (the unsharded path), measured after the sharded one
        Path("/proc/self/clear_refs").write_text("5")
        base_whole = _status_kb("VmRSS")
        whole = load_hf_model(hf_dir).eval()
        record["whole_load_peak_bytes"] = (_status_kb("VmHWM") - base_whole) * 1024
        with torch.no_grad():
            ref = whole(tokens)
        if not (e := rel(ref, logits)) <= TOL:
            failures.append(f"logits of the sharded model differ from the whole model: {e:.2e}")
    records = [None] * W
    dist.all_gather_object(records, record)
    if r == 0:
        out.write_text(json.dumps(records, indent=2))
    return finish(failures)


if __name__ == "__main__":
    exit_worker(main())
