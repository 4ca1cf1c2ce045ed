"""bf16 (and fp16) end to end: under CPU autocast every variant and path gets bf16 q, k, v, trains a step,
and stays within bf16 error of its fp32 loss; fp16 likewise for every variant; FSDP2 computes with bf16
parameters and reduces in fp32."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from helpers import assert_rel
from longshard.models import ModelConfig, Transformer

SP = {"block": 16, "local_blocks": 2, "vert_stride": 2}
NSA = {"compress_block": 16, "compress_stride": 8, "select_block": 16, "n_select": 2, "n_local": 1, "window": 32}
CASES = {
    "dense_sdpa": {"name": "dense", "options": {"backend": "sdpa"}},
    "dense_naive": {"name": "dense", "options": {"backend": "naive"}},
    "gated": {"name": "dense", "gate": "elementwise"},
    "mixed": {"name": "mixed", "options": {"groups": [
        {"name": "dense", "heads": 2},
        {"name": "s2", "heads": 2, "options": {**SP, "allow_incomplete_coverage": True}}]}},
    **{f"nsa_{p}": {"name": "nsa", "options": {**NSA, "path": p}} for p in ("naive", "gather")},
    **{f"nosa_{p}": {"name": "nosa", "options": {"block": 16, "path": p}} for p in ("naive", "gather")},
    **{f"linear_{p}": {"name": "linear", "options": {"chunk": 16, "path": p}} for p in ("naive", "chunk", "triton")},
    # DMA's top-k is discrete: block scores within bf16 rounding of each other may be chosen differently
    # in bf16 and fp32 (a different, equally valid mask). Delta of unit scale separates the scores.
    **{f"dma_{p}": {"name": "dma", "options": {"block": 16, "keep_blocks": 2, "a_init": 0.5, "delta_std": 1.0,
                                               "path": p}} for p in ("naive", "gather")},
    **{f"moh_{p}": {"name": "moh", "options": {"shared_heads": 1, "top_k": 1, "path": p}} for p in ("naive", "routed")},
}
for _p in ("naive", "gather", "banded", "chunked", "flex", "triton"):
    CASES[f"s2_{_p}"] = {"name": "s2", "options": {**SP, "path": _p}}
    CASES[f"streaming_{_p}"] = {"name": "streaming", "options": {"sink": 16, "window": 32, "block": 16, "path": _p}}
    CASES[f"sliding_window_{_p}"] = {"name": "sliding_window", "options": {"window": 32, "block": 16, "path": _p}}

# bf16 matmuls and bf16 q/k/v (8-bit mantissa) move a 1-layer model's loss by ~1e-3 relative; 2e-2
# leaves room for the rounding of attention outputs without admitting a wrong result (a dropped
# block or a wrong mask changes this random model's loss by > 5e-2).
LOSS_TOL = 2e-2
# The core attention's output itself: bf16 q, k, v (and bf16 P @ V on the fused paths) against the fp32
# run, max-abs over max-abs. Observed <= 7e-3 on the softmax paths and <= 1.8e-2 on linear attention
# (unnormalised feature-map products); a wrong pattern (s2 vs sliding window on the same inputs) differs
# by 0.26.
OUT_TOL = 4e-2


def _step(spec: dict, packed: bool, dtype: torch.dtype | None):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=256,
                                    attention=[spec]))
    seen = []
    core = model.layers[0].attention.core_attention
    core.register_forward_pre_hook(lambda mod, args: seen.append(tuple(a.dtype for a in args[:3])))
    outs = []

    def record(mod, args, out) -> None:
        seen.append((out.dtype,))
        outs.append(out.detach().float())

    core.register_forward_hook(record)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, 96), generator=g)
    doc = torch.cumsum((torch.rand(2, 96, generator=g) < 0.05).long(), 1) if packed else None
    flex_cpu = spec.get("options", {}).get("path") == "flex"  # flex_attention has no CPU backward
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None), \
            torch.set_grad_enabled(not flex_cpu):
        out = model(tokens, doc_ids_BS=doc, labels_BS=tokens)
    if not flex_cpu:
        out.loss_sum.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return float(out.loss_sum.detach()) / int(out.n_tokens), seen, outs[0]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_step_every_variant_and_path(case, packed):
    if "triton" in case:
        pytest.importorskip("triton")
    loss32, seen32, o32 = _step(CASES[case], packed, None)
    loss16, seen16, o16 = _step(CASES[case], packed, torch.bfloat16)
    assert seen32 == [(torch.float32,) * 3, (torch.float32,)]  # fp32 stays fp32 (RoPE casts back)
    assert seen16 == [(torch.bfloat16,) * 3, (torch.bfloat16,)], seen16  # q, k, v and the output in bf16
    assert math.isfinite(loss16) and abs(loss16 - loss32) / loss32 <= LOSS_TOL, (loss32, loss16)
    assert_rel("core attention output bf16 vs fp32", o32, o16, OUT_TOL)


# fp16 on CPU is emulated (~10x slower than fp32): every variant once, on its default CPU training path
# and the paths whose arithmetic differs (naive, gather); packed documents (the harder masks).
FP16_CASES = ["dense_sdpa", "dense_naive", "gated", "mixed", "nsa_naive", "nsa_gather", "nosa_gather",
              "linear_chunk", "s2_chunked", "s2_gather", "streaming_chunked", "sliding_window_banded", "dma_gather",
              "moh_routed"]


@pytest.mark.parametrize("case", FP16_CASES)
def test_fp16_step_every_variant(case):
    """fp16 autocast (10-bit mantissa, 5-bit exponent): q, k, v and the output in fp16, finite gradients,
    the loss within bf16's bound of fp32 (fp16 rounds finer; overflow, not rounding, is its risk: a
    softmax or normaliser computed in fp16 that underflows gives NaN, as NSA's did)."""
    loss32, _, o32 = _step(CASES[case], True, None)
    loss16, seen16, o16 = _step(CASES[case], True, torch.float16)
    assert seen16 == [(torch.float16,) * 3, (torch.float16,)], seen16
    assert math.isfinite(loss16) and abs(loss16 - loss32) / loss32 <= LOSS_TOL, (loss32, loss16)
    assert_rel("core attention output fp16 vs fp32", o32, o16, OUT_TOL)


FSDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from longshard.models import ModelConfig, Transformer
from longshard.parallel import data_parallel
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:%d" % int(sys.argv[1]))
mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp", "sp", "tp"))
torch.manual_seed(0)
model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
wq = model.layers[0].attention.wq
seen = []
wq.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
model = data_parallel(model, mesh, "fsdp2", torch.bfloat16)
tokens = torch.randint(0, 64, (2, 16))
with torch.autocast("cpu", dtype=torch.bfloat16):
    model(tokens, labels_BS=tokens).loss_sum.backward()
grad = wq.weight.grad
print(seen[0], wq.weight.dtype, grad.dtype)
"""


def test_fsdp2_mixed_precision_gathers_bf16_keeps_fp32_master(tmp_path, env_cpu):
    from helpers import free_port

    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(free_port())], env=env_cpu,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # computed with bf16 (gathered) weights; sharded master weights and their gradients stay fp32
    assert proc.stdout.split() == ["torch.bfloat16", "torch.float32", "torch.float32"], proc.stdout
