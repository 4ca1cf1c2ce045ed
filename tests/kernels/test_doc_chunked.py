"""Dense causal attention over packed documents in document-bounded query chunks vs the naive mask."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.kernels.attention.doc_chunked import doc_chunked_attention, doc_chunks
from longshard.kernels.attention.naive import attention_naive, causal_doc_mask
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention

# fp32: the same keys per query, softmax split into chunks -> ~3e-7 observed; 1e-5 leaves margin
# without admitting a wrong key set (one missing key per row moves outputs by > 1e-2).
TOL = 1e-5
# bf16 inputs, fp32 accumulation inside the fused kernel: output rounding (2^-8) plus the inputs'
# own rounding; observed <= 9e-3 against the fp32 reference on the rounded inputs.
BF16_TOL = 3e-2


def _inputs(B, H, Hk, S, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hk, S, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hk, S, D, generator=g).to(dtype).requires_grad_()
    return q, k, v, torch.randn(B, H, S, D, generator=g).to(dtype)


def _reference(q, k, v, doc, scale):
    rep = q.shape[1] // k.shape[1]
    return attention_naive(q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1),
                           causal_doc_mask(q.shape[2], q.shape[2], doc), scale)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [16, 37, None])
@pytest.mark.parametrize("layout", [(4, 2), (3, 1), (2, 2)], ids=["gqa", "mqa", "mha"])
def test_doc_chunked_equals_naive(layout, chunk, fused):
    """Outputs and dq/dk/dv equal the naive masked attention at an odd length, for documents that
    are runs, one whole-sequence document, and ids that reappear later in a row."""
    H, Hk = layout
    B, S, D, scale = 3, 83, 8, 0.3
    q, k, v, go = _inputs(B, H, Hk, S, D, seed=1)
    g = torch.Generator().manual_seed(2)
    doc = torch.cumsum((torch.rand(B, S, generator=g) < 0.08).long(), 1)
    doc[1] = 4  # one document over the whole row
    doc[2, 60:] = doc[2, 0]  # an id that comes back after other documents
    ref = _reference(q, k, v, doc, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    out = doc_chunked_attention(q, k, v, doc, scale, chunk=chunk, fused=fused)
    assert_rel("o", ref, out, TOL)
    for label, a, b in zip(("dq", "dk", "dv"), ref_grads, torch.autograd.grad(out, (q, k, v), go), strict=True):
        assert_rel(label, a, b, TOL)


def test_doc_chunks_start_at_the_first_key_any_query_reads():
    doc = torch.tensor([[0] * 10 + [1] * 30 + [2] * 24, [7] * 48 + [3] * 16])
    chunks = doc_chunks(doc, chunk=16)
    assert [c[:2] for c in chunks] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    # the last chunk's queries are in documents starting at 40 (row 0) and 48 (row 1)
    assert [c[2] for c in chunks] == [0, 0, 0, 40]


@pytest.mark.parametrize("fused", [True, False])
def test_doc_chunked_bf16(fused):
    """bf16 in, bf16 out, within bf16 rounding of the fp32 reference (gradients too)."""
    B, H, Hk, S, D, scale = 2, 4, 2, 71, 16, 0.25
    q, k, v, go = _inputs(B, H, Hk, S, D, seed=5, dtype=torch.bfloat16)
    doc = (torch.arange(S)[None] // 20).expand(B, S).contiguous()
    ref = _reference(q, k, v, doc, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go.float())
    out = doc_chunked_attention(q, k, v, doc, scale, chunk=16, fused=fused)
    assert out.dtype == torch.bfloat16
    assert_rel("o", ref, out.float(), BF16_TOL)
    for label, a, b in zip(("dq", "dk", "dv"), ref_grads, torch.autograd.grad(out, (q, k, v), go), strict=True):
        assert b.dtype == torch.bfloat16
        assert_rel(label, a, b.float(), BF16_TOL)


def test_doc_chunked_fp64():
    """fp64 in (gradient checks, reference runs): the fused kernel's log-sum-exp is fp64 too (it was
    allocated fp32 and the fused backward refused it). 1e-6: PyTorch's fused CPU kernel takes its exp from
    a fast approximation (~1e-7 relative, observed 1.1e-7) even in fp64; a wrong key moves it by > 1e-2."""
    B, H, Hk, S, D, scale = 2, 4, 2, 41, 8, 0.3
    q, k, v, go = _inputs(B, H, Hk, S, D, seed=6, dtype=torch.float64)
    doc = (torch.arange(S)[None] // 13).expand(B, S).contiguous()
    rep = H // Hk
    ref = attention_naive(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), causal_doc_mask(S, S, doc),
                          scale)
    out = doc_chunked_attention(q, k, v, doc, scale, chunk=16, fused=True)
    assert out.dtype == torch.float64
    assert_rel("o", ref, out, 1e-6)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for label, a, b in zip(("dq", "dk", "dv"), ref_grads, torch.autograd.grad(out, (q, k, v), go), strict=True):
        assert_rel(label, a, b, 1e-6)


def test_dense_core_never_builds_a_full_mask():
    """The dense core with packed documents allocates nothing of S x S elements (forward or backward)."""
    from longshard.train.memory import TensorMemoryTracker

    B, H, Hk, S, D = 1, 4, 2, 2304, 8  # longer than one default chunk
    core = build_attention("dense", {}, AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=Hk,
                                                         head_dim=D))
    q, k, v, go = _inputs(B, H, Hk, S, D, seed=0)
    doc = (torch.arange(S)[None] // 300).contiguous()  # one document longer than a chunk
    sizes = []

    class Sizes(TensorMemoryTracker):
        def track(self, t):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() // max(1, t.shape[0] if t.dim() else 1))
            super().track(t)

    with Sizes():
        out = core(q, k, v, AttentionBatch(doc_ids_BS=doc))
        out.backward(go)
    assert max(sizes) < S * S // 4, max(sizes)  # the old path built a (B, 1, S, S) mask
    ref = _reference(q, k, v, doc, core.scale)
    assert_rel("o", ref, out, TOL)
