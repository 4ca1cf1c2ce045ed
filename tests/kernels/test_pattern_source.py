"""One pattern source per block-sparse variant: every form derives from ``band_spec``.

The block mask, token window/sinks, head slices, kept fraction and the band paths' head split all
come from the variant's :class:`BandFarSpec`; these tests hold each derived form to the spec's own
token-level rule (``band_far_keep_naive``), exactly (boolean masks, no tolerance).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.kernels.block_sparse.banded import band_far_attention
from longshard.kernels.block_sparse.chunked import band_far_attention_chunked
from longshard.kernels.block_sparse.naive import band_far_keep_naive
from longshard.kernels.block_sparse.pattern import BandFarSpec, dense_mask, sink_window_spec
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention

# gather/banded/chunked vs naive: the same fp32 softmax over the same keys, summed in another order.
TOL = 1e-5

LAYOUTS = {  # name, options, query heads, KV heads (Qwen2.5-like 14/2 and Llama-like 8/2 GQA)
    "s2-kv": ("s2", {"block": 4, "local_blocks": 2, "vert_stride": 2, "sink_blocks": 1, "shard": "kv"}, 8, 2),
    "s2-query": ("s2", {"block": 4, "local_blocks": 1, "vert_stride": 7, "offset": 1, "shard": "query"}, 14, 2),
    "streaming-retrieval": ("streaming", {"block": 4, "sink": 5, "window": 7, "retrieval_heads": [1]}, 8, 4),
    "streaming-gates": ("streaming_gated", {"block": 8, "sink": 3, "window": 9}, 4, 2),
    "sliding": ("sliding_window", {"block": 4, "window": 6}, 4, 1),
    "sliding-sink": ("sliding_window", {"block": 8, "window": 17, "sink": 9}, 14, 2),
}


def _core(name, opts, H, kv):
    ctx = AttentionContext(layer_idx=0, n_layers=2, n_heads=H, n_kv_heads=kv, head_dim=8)
    return build_attention(name, opts, ctx)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("S", [1, 29, 64])
def test_pattern_derives_from_the_spec(layout, S):
    """The SparsePattern every non-band path reads (naive, gather, flex, Triton, decoding) keeps
    exactly the keys of the spec's rule, for the whole layer and for each rank's head slice."""
    name, opts, H, kv = LAYOUTS[layout]
    core = _core(name, opts, H, kv)
    n = -(-S // core.block)
    expect = band_far_keep_naive(core.band_spec(n), S)
    assert torch.equal(dense_mask(core.pattern(n, torch.device("cpu")), S, S, None, torch.device("cpu"))[0], expect)
    group = H // kv
    slices = [(0, group), (group, H)] if kv > 1 else [(0, H)]  # two ranks' heads (whole GQA groups)
    for start, stop in slices:
        core.set_head_slice(start, stop)
        local = dense_mask(core.pattern(n, torch.device("cpu")), S, S, None, torch.device("cpu"))[0]
        assert torch.equal(local, expect[start:stop]), (start, stop)
        assert torch.equal(band_far_keep_naive(core.local_band_spec(n), S), expect[start:stop])


@pytest.mark.parametrize("layout", ["streaming-retrieval", "s2-kv", "sliding-sink"])
@pytest.mark.parametrize("path", ["banded", "chunked", "gather"])
def test_head_sliced_paths_match_the_whole_layer(layout, path):
    """A head slice (tensor parallel / Ulysses) of a band variant, through each path — streaming's
    retrieval heads split off to dense attention inside the band paths — equals those heads of the
    whole layer on the naive path, outputs and input gradients."""
    name, opts, H, kv = LAYOUTS[layout]
    S, group = 37, H // kv
    whole = _core(name, {**opts, "path": "naive"}, H, kv)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, S, 8, generator=g) for h in (H, kv, kv))
    doc = torch.tensor([[0] * 20 + [1] * 17, [0] * S])  # packed documents in one row
    batch = AttentionBatch(doc_ids_BS=doc)
    start, stop = group, 3 * group  # a slice with retrieval heads and streaming heads
    qs, ks, vs = (t[:, a:b].clone().requires_grad_() for t, a, b in
                  ((q, start, stop), (k, start // group, stop // group), (v, start // group, stop // group)))
    ref = whole(q, k, v, batch)[:, start:stop]
    part = _core(name, {**opts, "path": path}, H, kv)
    part.set_head_slice(start, stop)
    out = part(qs, ks, vs, batch)
    assert_rel(f"{layout} {path} slice output", ref, out, TOL)
    go = torch.randn_like(out, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(out, (qs, ks, vs), go)
    qr, kr, vr = (t[:, a:b].clone().requires_grad_() for t, a, b in
                  ((q, start, stop), (k, start // group, stop // group), (v, start // group, stop // group)))
    whole.set_head_slice(start, stop)
    ref_grads = torch.autograd.grad(whole(qr, kr, vr, batch), (qr, kr, vr), go)
    for label, a, b in zip(("dq", "dk", "dv"), ref_grads, grads):
        assert_rel(f"{layout} {path} {label}", a, b, TOL)


def test_sink_window_spec_marks_retrieval_heads_full():
    spec = sink_window_spec(4, torch.tensor([True, False, True]), sink=5, window=6)
    assert spec.full_H.tolist() == [False, True, False]
    assert spec.window_H.tolist() == [6, 0, 6] and spec.far_token_limit_H.tolist() == [5, 0, 5]
    assert sink_window_spec(4, torch.ones(3, dtype=torch.bool), 5, 6).full_H is None


def test_band_kernels_refuse_full_heads():
    spec = sink_window_spec(4, torch.tensor([True, False]), sink=0, window=5)
    q = torch.randn(1, 2, 9, 8)
    for fn in (band_far_attention, band_far_attention_chunked):
        with pytest.raises(ValueError, match="full-attention heads"):
            fn(q, q, q, spec)


def test_full_heads_must_be_whole_gqa_groups():
    core = _core("streaming", {"block": 4, "sink": 0, "window": 4, "retrieval_heads": [0], "path": "banded"}, 4, 2)
    core.streaming_H[:] = torch.tensor([False, True, True, True])  # half of KV group 0 full: not a layout
    q, k = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="whole GQA groups"):
        core(q, k, k, AttentionBatch())


def test_specs_without_a_pattern_form_are_refused():
    """The pattern's token rule applies one window/sink to every kept block: a far-block limit other
    than a windowed head's sinks, or a window wider than the band, cannot be said that way."""
    far = torch.tensor([[0], [0]])
    ok = BandFarSpec(4, 3, far, torch.tensor([5, 0]), torch.tensor([2, 0]), torch.tensor([2, 0]))
    assert torch.equal(dense_mask(ok.to_pattern(6), 24, 24, None, torch.device("cpu"))[0], band_far_keep_naive(ok, 24))
    for bad in (BandFarSpec(4, 3, far, torch.tensor([5, 0]), torch.tensor([2, 0]), torch.tensor([3, 0])),
                BandFarSpec(4, 3, far, None, None, torch.tensor([0, 2])),
                BandFarSpec(4, 2, far, torch.tensor([9, 9]), torch.tensor([2, 2]), torch.tensor([2, 2]))):
        with pytest.raises(ValueError, match="no SparsePattern form"):
            bad.to_pattern(6)
