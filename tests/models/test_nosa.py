"""NOSA: gather path vs naive reference (outputs and every gradient), selection rules, locality, training."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel, train_tiny
from longshard.errors import ConfigError
from longshard.kernels.nosa import NOSAGeometry, block_summaries, importance_bias, select_far_blocks
from longshard.kernels.nosa.select import read_slots
from longshard.models import ModelConfig, Transformer
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention

OPTS = {"block": 4, "sink_blocks": 1, "local_blocks": 2, "query_blocks": 2, "static_blocks": 2}
# gather vs naive: identical fp32 softmaxes over the same keys, summed in another order -> ~1e-6.
TOL = 1e-5


def _module(path, H=4, kv=2, D=8, seed=0, **opts):
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=kv, head_dim=D, model_dim=16)
    torch.manual_seed(seed)
    m = build_attention("nosa", {**OPTS, **opts, "path": path}, ctx)
    with torch.no_grad():  # a non-trivial importance score, so the static choice and the bias matter
        m.importance_w.normal_(0, 1.0)
        m.importance_b.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("S", [1, 6, 23, 77, 300])  # 300 > one query chunk (256)
@pytest.mark.parametrize("kv", [2, 1])
@pytest.mark.parametrize("packed", [False, True])
def test_gather_matches_naive_with_all_grads(S, kv, packed):
    H, D = 4, 8
    ref, fast = _module("naive", H, kv, D), _module("gather", H, kv, D)
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(S)
    q = torch.randn(2, H, S, D, generator=g, requires_grad=True)
    k = torch.randn(2, kv, S, D, generator=g, requires_grad=True)
    v = torch.randn(2, kv, S, D, generator=g, requires_grad=True)
    doc = torch.cumsum((torch.rand(2, S, generator=g) < 0.05).long(), 1) if packed else None
    go = torch.randn(2, H, S, D, generator=g)
    results = []
    for m in (ref, fast):
        o = m(q, k, v, AttentionBatch(doc_ids_BS=doc))
        # allow_unused: with fewer than sink + local + 1 blocks no far block exists, so no importance grad
        grads = torch.autograd.grad(o, [q, k, v, *m.parameters()], go, allow_unused=True)
        results.append((o, *grads))
    names = ["o", "dq", "dk", "dv"] + [f"d{n}" for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, *results):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel(name, a, b, TOL)
    if S >= 4 * 4:  # far blocks exist: the importance score is trained through the bias
        assert results[0][4].abs().max() > 0 and results[0][5].abs().max() > 0


def _brute_force_blocks(geo, q, kbar, score, t, doc=None):
    """Blocks query position t reads per KV head, straight from the rule's definition."""
    H, kv = q.shape[1], kbar.shape[1]
    i = t // geo.block
    out = []
    for h in range(kv):
        far = [j for j in range(kbar.shape[2]) if geo.sink_blocks <= j <= i - geo.local_blocks
               and (doc is None or doc[0, j * geo.block + geo.block - 1] == doc[0, t])]
        static = sorted(far, key=lambda j: (-float(score[0, h, j]), j))[: geo.static_blocks]
        qs = {j: sum(float(q[0, g, t] @ kbar[0, h, j]) for g in range(h * H // kv, (h + 1) * H // kv))
              for j in far if j not in static}
        query = sorted(qs, key=lambda j: (-qs[j], j))[: geo.query_blocks]
        base = {j for j in range(geo.sink_blocks) if j <= i} | {j for j in range(i - geo.local_blocks + 1, i + 1)
                                                                if j >= 0}
        out.append(base | set(static) | set(query))
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_selection_follows_the_rule(packed):
    geo = NOSAGeometry(4, sink_blocks=1, local_blocks=2, query_blocks=2, static_blocks=3)
    S, H, kv, D = 61, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, H, S, D, generator=g), torch.randn(1, kv, S, D, generator=g)
    doc = (torch.arange(S) >= 30).long()[None] if packed else None
    kbar = block_summaries(k, geo.block)
    score, bias = importance_bias(kbar, torch.randn(kv, D, generator=g), torch.zeros(kv))
    far_idx, far_ok = select_far_blocks(geo, q, kbar, score, S, doc)
    idx, ok, _ = read_slots(geo, far_idx, far_ok, bias, S, S)
    for t in range(S):
        expect = _brute_force_blocks(geo, q, kbar, score, t, doc)
        for h in range(kv):
            got = {int(j) for j, o in zip(idx[0, h, t], ok[0, h, t]) if o}
            assert got == expect[h], (t, h, got, expect[h])
            assert len(got) == int(ok[0, h, t].sum()), "a block is read twice"


def test_locality_bounds_changes_between_steps():
    """The static far set changes only when a block becomes far, by at most one block: consecutive
    queries share >= static_blocks - 1 far blocks (without locality they may share none)."""
    geo = NOSAGeometry(4, sink_blocks=1, local_blocks=1, query_blocks=2, static_blocks=4)
    S, H, kv, D = 200, 2, 1, 8
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, H, S, D, generator=g), torch.randn(1, kv, S, D, generator=g)
    kbar = block_summaries(k, geo.block)
    score, _ = importance_bias(kbar, torch.randn(kv, D, generator=g), torch.zeros(kv))
    shared = {}
    for locality in (True, False):
        gg = NOSAGeometry(4, 1, 1, 2, 4, locality)
        idx, ok = select_far_blocks(gg, q, kbar, score, S)
        sets = [{int(j) for j, o in zip(idx[0, 0, t], ok[0, 0, t]) if o} for t in range(S)]
        shared[locality] = min(len(a & b) for a, b in zip(sets[40:], sets[41:]))
    assert shared[True] >= geo.static_blocks - 1
    assert shared[False] < shared[True]


def test_options_are_checked():
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8)
    with pytest.raises(ConfigError, match="options.block"):
        build_attention("nosa", {"block": 0}, ctx)
    with pytest.raises(ConfigError, match="options.static_blocks"):
        build_attention("nosa", {"static_blocks": -1}, ctx)
    with pytest.raises(ConfigError, match="options.path"):
        build_attention("nosa", {"path": "flex"}, ctx)


def test_nosa_model_trains_its_importance_score():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                    attention=[{"name": "nosa", "options": OPTS}]))
    before = model.layers[0].attention.core_attention.importance_w.detach().clone()
    losses = train_tiny(model, steps=6)
    assert losses[-1] < losses[0]
    assert not torch.equal(before, model.layers[0].attention.core_attention.importance_w)
