"""Block-sparse attention over a buffer of key blocks (the sparsity-aware exchange's local step) vs naive."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.kernels.block_sparse import block_sparse_attention_naive
from longshard.kernels.block_sparse.gathered import BufferLayout, gathered_block_attention
from longshard.models.attention import AttentionContext, build_attention

# fp32: the same keys per query, softmax over a different key order and chunking -> ~1e-7.
TOL = 1e-5
VARIANTS = [
    ("s2", {"block": 8, "local_blocks": 2, "vert_stride": 3, "allow_incomplete_coverage": True}, 6, 2),
    ("streaming", {"block": 8, "sink": 5, "window": 11, "retrieval_heads": [1]}, 4, 2),  # token windows, odd
    ("sliding_window", {"block": 8, "window": 13}, 3, 1),  # MQA, odd head count
]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_buffer_attention_equals_single_device(variant, packed, fused):
    """Queries in a permuted block order and every key block shuffled into a padded buffer give the
    single-device naive outputs and gradients (dq, dk, dv), with documents and without."""
    name, opts, H, Hkv = variant
    blk, S, B, D = 8, 88, 2, 8  # 11 blocks
    g = torch.Generator().manual_seed(3)
    core = build_attention(name, opts, AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                                                        head_dim=D))
    pat = core.pattern(S // blk, torch.device("cpu"))
    q = torch.randn(B, H, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    doc = torch.cumsum((torch.rand(B, S, generator=g) < 0.06).long(), 1) if packed else None
    go = torch.randn(B, H, S, D, generator=g)
    ref = block_sparse_attention_naive(q, k, v, pat, doc)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)

    n = S // blk
    q_blocks = torch.randperm(n, generator=g)
    q_pos = (q_blocks[:, None] * blk + torch.arange(blk)).flatten()
    # per KV head its own shuffle of all blocks, plus one padding block in the middle
    slots = [torch.cat([p[:4], torch.tensor([-1]), p[4:]]) for p in (torch.randperm(n, generator=g)
                                                                    for _ in range(Hkv))]
    k_pos = torch.stack([torch.where(s[:, None] >= 0, s[:, None] * blk + torch.arange(blk), -1).flatten()
                         for s in slots])  # (Hkv, N)
    idx = k_pos.clamp_min(0)
    kbuf = torch.stack([k[:, h, idx[h]] for h in range(Hkv)], 1)
    vbuf = torch.stack([v[:, h, idx[h]] for h in range(Hkv)], 1)
    kbuf = torch.where((k_pos >= 0)[None, :, :, None], kbuf, 7.0)  # padding holds garbage: must be masked
    out = gathered_block_attention(q[:, :, q_pos], kbuf, vbuf, pat, BufferLayout(q_pos, k_pos, doc),
                                   chunk_blocks=3, fused=fused)
    assert_rel("o", ref[:, :, q_pos], out, TOL)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go[:, :, q_pos])
    for label, a, b in (("dq", ref_grads[0], dq), ("dk", ref_grads[1], dk), ("dv", ref_grads[2], dv)):
        assert_rel(label, a, b, TOL)


def test_buffer_attention_fp64_on_the_fused_kernel():
    """fp64 inputs through the fused CPU kernel: the log-sum-exp it keeps for backward stays fp64 (it was cast
    to fp32 and the fused backward refused it). 1e-6: the fused kernel's exp is a fast approximation (~1e-7
    relative) even in fp64; a wrong key moves outputs by > 1e-2."""
    name, opts, H, Hkv = VARIANTS[1]
    core = build_attention(name, opts, AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                                                        head_dim=8))
    S = 40
    pat = core.pattern(S // 8, torch.device("cpu"))
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, S, 8, generator=g, dtype=torch.float64).requires_grad_() for h in (H, Hkv, Hkv))
    ref = block_sparse_attention_naive(q, k, v, pat)
    out = gathered_block_attention(q, k, v, pat, BufferLayout(torch.arange(S), torch.arange(S).expand(Hkv, S)),
                                   chunk_blocks=2, fused=True)
    assert out.dtype == torch.float64
    assert_rel("o", ref, out, 1e-6)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for label, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(ref, (q, k, v), go),
                           torch.autograd.grad(out, (q, k, v), go), strict=True):
        assert_rel(label, a, b, 1e-6)


def test_buffer_attention_bf16_keeps_dtype():
    name, opts, H, Hkv = VARIANTS[0]
    core = build_attention(name, opts, AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                                                        head_dim=8))
    pat = core.pattern(4, torch.device("cpu"))
    q = torch.randn(1, H, 32, 8, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, Hkv, 32, 8, dtype=torch.bfloat16, requires_grad=True)
    lay = BufferLayout(torch.arange(32), torch.arange(32).expand(Hkv, 32))
    out = gathered_block_attention(q, k, k, pat, lay)
    out.float().sum().backward()
    assert out.dtype == q.grad.dtype == k.grad.dtype == torch.bfloat16
    ref = block_sparse_attention_naive(q.float(), k.float(), k.float(), pat)
    assert_rel("bf16 o", ref, out.float(), 2e-2)  # bf16 inputs and P @ V: a few bf16 eps
