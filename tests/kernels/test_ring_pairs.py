"""Chunk-pair attention (the ring's per-step kernels) against the naive specification.

A query chunk attends a fully visible key chunk and its own (causal) chunk; the two partial results
are merged by log-sum-exp, and each pair's backward runs from the *merged* statistics. Outputs and
every gradient are compared with one attention over both key chunks (autograd through the naive
reference). Both fused backends: PyTorch's CPU flash kernel and the Triton kernel (under the
interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.kernels.attention.fused_cpu import merge_partials
from longshard.kernels.attention.naive import attention_naive
from longshard.kernels.attention.pairs import (
    pair_attention_naive,
    pair_backward_naive,
    pair_kernel,
    shares_document,
)
from longshard.kernels.triton_support import triton_installed

CUDA = torch.cuda.is_available()
# fp32: the same math in another summation order (online softmax, tiles) -> ~1e-6; 2e-5 leaves margin.
TOL = 2e-5
# fp16 inputs on the Triton tensor-core branch: q, k, v rounded to 11-bit mantissas and P cast to fp16
# before the PV / dS products; a few roundings compound to ~5e-3 of the largest value.
TOL_FP16 = 1e-2
BACKENDS = ["cpu_fused", pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
    not triton_installed(), reason="triton is not installed")])]


def _rand(*shape, seed: int, dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()


def _reference(q, k1, v1, k2, v2, doc_q, doc_1, doc_2, scale):
    """One fp32 attention over [visible chunk k1; own chunk k2 (causal)], as the ring splits it."""
    n = q.shape[2]
    keep = torch.cat([torch.ones(n, n, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
    keep = keep.to(q.device)[None, None]
    if doc_q is not None:
        keep = keep & (doc_q[:, :, None] == torch.cat([doc_1, doc_2], 1)[:, None, :])[:, None]
    return attention_naive(q.float(), torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), keep, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,packed", [(13, False), (13, True), (70, True)])  # ragged tile; 2 tiles of 64
def test_pairs_merge_to_one_attention(backend, dtype, n, packed):
    if backend == "cpu_fused" and dtype == torch.float16:
        pytest.skip("the CPU backend computes in fp32 (inputs are upcast)")
    device = torch.device("cuda" if CUDA and backend == "triton" else "cpu")
    B, H, Hkv, D = 2, 4, 2, 16
    scale = D ** -0.5
    q = _rand(B, H, n, D, seed=1, dtype=dtype, device=device)
    k1, v1, k2, v2 = (_rand(B, Hkv, n, D, seed=s, dtype=dtype, device=device) for s in (2, 3, 4, 5))
    doc_q = doc_1 = doc_2 = None
    if packed:  # the key chunk ends a document that the query chunk continues; a new one starts in the chunk
        doc_1 = torch.tensor([[0] * (n // 2) + [1] * (n - n // 2), [0] * n])
        doc_q = torch.tensor([[1] * (n // 3) + [2] * (n - n // 3), [0] * n])
        doc_1, doc_q = doc_1.to(device), doc_q.to(device)
        doc_2 = doc_q
    ops = pair_kernel(device, scale, backend)
    o1, l1 = ops.forward(q, k1, v1, False, doc_q, doc_1)
    o2, l2 = ops.forward(q, k2, v2, True, doc_q, doc_2)
    assert o1.dtype == torch.float32 and l1.dtype == torch.float32
    # each pair against the specification
    tol = TOL if dtype == torch.float32 else TOL_FP16
    for (o, lse), kk, vv, causal, dk in (((o1, l1), k1, v1, False, doc_1), ((o2, l2), k2, v2, True, doc_2)):
        o_ref, lse_ref = pair_attention_naive(q, kk, vv, scale, causal, doc_q, dk)
        assert_rel("pair output", o_ref, o, tol)
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)), "rows with no visible key"
        finite = torch.isfinite(lse_ref)
        assert_rel("pair log-sum-exp", lse_ref[finite], lse[finite], tol)
    o, lse = merge_partials(o1, l1, o2, l2)
    ref = _reference(q, k1, v1, k2, v2, doc_q, doc_1, doc_2, scale)
    assert_rel("merged output", ref, o, tol)
    # backward from the merged statistics, summed over the pairs
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(9)).to(device)
    ref.backward(do)
    do_in = do.to(dtype)
    delta = (do_in.float() * o.to(dtype).float()).sum(-1)
    g1 = ops.backward(do_in, q.detach(), k1.detach(), v1.detach(), o, lse, delta, False, doc_q, doc_1)
    g2 = ops.backward(do_in, q.detach(), k2.detach(), v2.detach(), o, lse, delta, True, doc_q, doc_2)
    assert all(g.dtype == torch.float32 for g in (*g1, *g2)), "gradients are returned in fp32 for summing"
    assert_rel("dq", q.grad, g1[0] + g2[0], tol)
    for g, t, name in ((g1[1], k1, "dk1"), (g1[2], v1, "dv1"), (g2[1], k2, "dk2"), (g2[2], v2, "dv2")):
        assert_rel(name, t.grad, g, tol)
    # and the backward specification agrees with autograd
    s1 = pair_backward_naive(do_in, q, k1, v1, lse, delta, scale, False, doc_q, doc_1)
    assert_rel("naive dk1", k1.grad, s1[1], tol)


def test_no_shared_document_is_skipped():
    a, b = torch.tensor([[0, 0, 1]]), torch.tensor([[2, 2, 3]])
    assert not shares_document(a, b) and shares_document(a, torch.tensor([[1, 5, 6]]))
    assert shares_document(None, None)
