"""A block-sparse variant's softmax scale reaches every single-device path (as it reaches the sparse
exchange, which reads ``softmax_scale``): a variant with its own scale trains the same with and
without sequence parallelism."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_rel
from longshard.kernels.block_sparse.naive import block_sparse_attention_naive
from longshard.models.attention import AttentionBatch, AttentionContext
from longshard.models.attention.s2 import S2Attention, S2Options

# every path against the fp32 naive specification: the same softmax over the same kept keys, summed in
# another order -> ~1e-6; a wrong scale (1/sqrt(D) instead of 0.3/sqrt(D)) is off by tens of percent.
TOL = 1e-5


class ScaledS2(S2Attention):
    """S2 with a temperature of its own (a variant may set any scale)."""

    @property
    def softmax_scale(self) -> float:
        return 0.3 / math.sqrt(self.ctx.head_dim)


@pytest.mark.parametrize("path", ["naive", "gather", "banded", "chunked", "flex"])
@pytest.mark.parametrize("packed", [False, True])
def test_a_variant_scale_reaches_every_path(path, packed):
    B, H, Hkv, S, D = 2, 4, 2, 37, 8
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=Hkv, head_dim=D)
    core = ScaledS2(ctx, S2Options(block=4, local_blocks=2, vert_stride=4, path=path))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, generator=g).requires_grad_() for h in (H, Hkv, Hkv))
    doc = torch.tensor([[0] * 20 + [1] * 17, [0] * 37]) if packed else None
    try:
        out = core(q, k, v, AttentionBatch(doc_ids_BS=doc))
    except (RuntimeError, NotImplementedError) as e:  # flex_attention without a CPU backend in this torch
        pytest.skip(f"{path} does not run here: {e}")
    pattern = core.pattern(math.ceil(S / 4), q.device)
    ref = block_sparse_attention_naive(q, k, v, pattern, doc, scale=core.softmax_scale)
    assert_rel(f"{path} output", ref, out, TOL)
    go = torch.randn_like(ref, generator=torch.Generator().manual_seed(1))
    for name, a, b in zip("qkv", torch.autograd.grad(ref, (q, k, v), go), torch.autograd.grad(out, (q, k, v), go)):
        assert_rel(f"{path} d{name}", a, b, TOL)
