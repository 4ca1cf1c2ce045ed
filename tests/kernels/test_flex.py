"""flex_attention path of the block-sparse variants: forward on CPU (compiled), forward+backward on CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.kernels.block_sparse import SparsePattern, block_sparse_attention_naive
from longshard.kernels.block_sparse.flex import block_sparse_attention_flex, flex_available
from longshard.kernels.block_sparse.pattern import sink_window_pattern
from longshard.models.attention.s2 import S2Options, s2_kept_blocks

pytestmark = pytest.mark.skipif(not flex_available(), reason="this torch has no flex_attention")

# flex computes the softmax blockwise (online), the reference in one pass: fp32 ~1e-6.
TOL = 1e-5


def _patterns(H, kv):
    s2 = s2_kept_blocks(8, kv, S2Options(block=32, local_blocks=2, vert_stride=2)).repeat_interleave(H // kv, 0)
    return {
        "s2": SparsePattern(32, s2),
        "streaming": sink_window_pattern(8, 32, H, torch.tensor([True, False] * (H // 2)), 5, 40),
    }


def test_flex_forward_cpu_matches_naive():
    H, kv, S, D = 4, 2, 256, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, H, S, D, generator=g), torch.randn(1, kv, S, D, generator=g), torch.randn(1, kv, S, D,
                                                                                                       generator=g)
    doc = torch.tensor([[0] * 100 + [1] * 156])
    with torch.no_grad():
        for name, pat in _patterns(H, kv).items():
            assert_rel(name, block_sparse_attention_naive(q, k, v, pat, doc),
                       block_sparse_attention_flex(q, k, v, pat, doc), TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention backward needs CUDA")
def test_flex_forward_backward_cuda():
    H, kv, S, D = 4, 2, 256, 64
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, H, S, D, device=dev, generator=g, requires_grad=True)
    k = torch.randn(1, kv, S, D, device=dev, generator=g, requires_grad=True)
    v = torch.randn(1, kv, S, D, device=dev, generator=g, requires_grad=True)
    go = torch.randn(1, H, S, D, device=dev, generator=g)
    for name, pat in _patterns(H, kv).items():
        pat = pat.to(dev)
        ref = block_sparse_attention_naive(q, k, v, pat)
        out = block_sparse_attention_flex(q, k, v, pat)
        for label, a, b in zip(["o", "dq", "dk", "dv"], [ref, *torch.autograd.grad(ref, (q, k, v), go)],
                               [out, *torch.autograd.grad(out, (q, k, v), go)]):
            assert_rel(f"{name} {label}", a, b, 1e-4)  # TF32-free fp32 on GPU, blockwise softmax


def test_flex_block_mask_built_once_per_length(monkeypatch):
    """Without packed documents the BlockMask depends on the pattern and S only: built on the first
    call and reused (each build evaluates the mask over H x S^2); with documents it is rebuilt."""
    import torch.nn.attention.flex_attention as fa

    builds = []
    real = fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **k: builds.append(1) or real(*a, **k))
    H, kv, S, D = 2, 1, 128, 16
    pat = _patterns(H, kv)["s2"]
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, H, S, D, generator=g), torch.randn(1, kv, S, D, generator=g), torch.randn(1, kv, S, D,
                                                                                                       generator=g)
    with torch.no_grad():
        first = block_sparse_attention_flex(q, k, v, pat)
        again = block_sparse_attention_flex(q, k, v, pat)
        assert len(builds) == 1
        assert torch.equal(first, again)
        assert_rel("cached mask", block_sparse_attention_naive(q, k, v, pat), again, TOL)
        block_sparse_attention_flex(q[:, :, :64], k[:, :, :64], v[:, :, :64], pat)  # another length
        assert len(builds) == 2
        doc = torch.tensor([[0] * 50 + [1] * 78])
        block_sparse_attention_flex(q, k, v, pat, doc)
        block_sparse_attention_flex(q, k, v, pat, doc)
        assert len(builds) == 4
