"""Property tests (hypothesis) over shapes, head counts, block sizes and lengths: sequence sharding
covers every token once with the right positions, and block-sparse paths agree with the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from hypothesis import given, settings
from hypothesis import strategies as st
from longshard.errors import ConfigError
from longshard.kernels.block_sparse import SparsePattern, block_sparse_attention_gather, block_sparse_attention_naive
from longshard.kernels.block_sparse.pattern import dense_mask
from longshard.parallel.layout import shard_batch


@st.composite
def layouts(draw):
    degree = draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["contiguous", "zigzag", "hybrid"]))
    inner = 1
    if mode == "hybrid":
        inner = draw(st.sampled_from([d for d in (1, 2, 4) if degree % d == 0]))
    need = 2 * degree if mode != "contiguous" else degree
    S = need * draw(st.integers(1, 6))
    n_docs = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(1, max(S - 1, 1)), min_size=n_docs - 1, max_size=n_docs - 1)))
    doc = torch.zeros(S, dtype=torch.long)
    for c in cuts:
        doc[c:] += 1
    return degree, mode != "contiguous", inner, S, doc


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans())
def test_sharding_covers_every_token_once_with_global_positions(layout, packed):
    degree, zigzag, inner, S, doc = layout
    tokens = torch.arange(S)[None]  # token value = global index
    labels = tokens + 1000
    doc_ids = doc[None] if packed else None
    seen = []
    for rank in range(degree):
        sh = shard_batch(tokens, labels, doc_ids, rank, degree, zigzag, inner)
        idx = sh["tokens"][0]
        assert len(idx) == S // degree  # every rank holds the same number of tokens
        assert torch.equal(sh["labels"][0], idx + 1000)
        if packed:
            assert torch.equal(sh["doc_ids"][0], doc[idx])
            # position = distance to the start of the token's own document, computed globally
            start = torch.tensor([int((doc == doc[i]).nonzero()[0]) for i in idx.tolist()])
            assert torch.equal(sh["position_ids"][0], idx - start)
        else:
            assert torch.equal(sh["position_ids"][0], idx)
        seen.append(idx)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(S))  # no token dropped or duplicated


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(1, 50))
def test_sharding_rejects_lengths_the_layout_cannot_split(degree, S):
    tokens = torch.zeros(1, S, dtype=torch.long)
    for zigzag, need in ((False, degree), (True, 2 * degree)):
        if S % need:
            with pytest.raises(ConfigError, match="train.seq_len"):
                shard_batch(tokens, tokens, None, 0, degree, zigzag)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
    st.sampled_from([1, 3, 4, 8]),
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_block_sparse_gather_equals_reference_and_is_causal(heads, block, S, seed, packed):
    H, kv = heads
    g = torch.Generator().manual_seed(seed)
    n = -(-S // block)
    keep = (torch.rand(H, n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
    window = torch.randint(0, 2 * block + 2, (H,), generator=g)
    sink = torch.randint(0, 3, (H,), generator=g)
    pat = SparsePattern(block, keep, window, sink)
    doc = torch.cumsum((torch.rand(2, S, generator=g) < 0.15).long(), 1) if packed else None
    mask = dense_mask(pat, S, S, doc, torch.device("cpu"))
    assert not mask.triu(1).any()  # causal: no query sees a later key
    assert mask.diagonal(dim1=-2, dim2=-1).all()  # every query sees itself: no empty softmax row
    q = torch.randn(2, H, S, 8, generator=g, requires_grad=True)
    k = torch.randn(2, kv, S, 8, generator=g, requires_grad=True)
    v = torch.randn(2, kv, S, 8, generator=g, requires_grad=True)
    ref = block_sparse_attention_naive(q, k, v, pat, doc)
    out = block_sparse_attention_gather(q, k, v, pat, doc)
    go = torch.randn(ref.shape, generator=g)
    g_ref = torch.autograd.grad(ref, (q, k, v), go)
    g_out = torch.autograd.grad(out, (q, k, v), go)
    assert_rel("o", ref, out, 1e-5)  # same fp32 softmax over the same keys, other summation order
    for name, a, b in zip(("dq", "dk", "dv"), g_ref, g_out):
        assert_rel(name, a, b, 1e-5)
