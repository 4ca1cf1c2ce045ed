"""NSA: gather path vs naive reference (outputs and every gradient), selection rules, training."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel, train_tiny
from longshard.errors import ConfigError
from longshard.kernels.nsa import NSAGeometry, select_blocks
from longshard.models import ModelConfig, Transformer
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention

OPTS = {"compress_block": 4, "compress_stride": 2, "select_block": 4, "n_select": 3, "n_local": 1, "window": 5}
# gather vs naive: identical fp32 softmaxes over the same keys, summed in another order -> ~1e-6.
TOL = 1e-5


def _module(path, H=4, kv=2, D=8, E=16, seed=0):
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=kv, head_dim=D, model_dim=E)
    torch.manual_seed(seed)
    m = build_attention("nsa", dict(OPTS, path=path), ctx)
    with torch.no_grad():  # move off the mean-pooling init so every parameter matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("S", [1, 5, 23, 40, 300])  # 300: several query chunks (64) after the causal prefix (12)
@pytest.mark.parametrize("kv", [2, 1])
@pytest.mark.parametrize("packed", [False, True])
def test_gather_matches_naive_with_all_grads(S, kv, packed):
    H, D, E = 4, 8, 16
    ref, fast = _module("naive", H, kv, D, E), _module("gather", H, kv, D, E)
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(S)
    q = torch.randn(2, H, S, D, generator=g, requires_grad=True)
    k = torch.randn(2, kv, S, D, generator=g, requires_grad=True)
    v = torch.randn(2, kv, S, D, generator=g, requires_grad=True)
    x = torch.randn(2, S, E, generator=g, requires_grad=True)
    doc = torch.cumsum((torch.rand(2, S, generator=g) < 0.1).long(), 1) if packed else None
    go = torch.randn(2, H, S, D, generator=g)
    results = []
    for m in (ref, fast):
        o = m(q, k, v, AttentionBatch(doc_ids_BS=doc, x_BSE=x))
        # allow_unused: below one compressed block (S < 4) the compression weights are not used
        grads = torch.autograd.grad(o, [q, k, v, x, *m.parameters()], go, allow_unused=True)
        results.append((o, *grads))
    names = ["o", "dq", "dk", "dv", "dx"] + [f"d{n}" for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, *results):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_rel(name, a, b, TOL)
    assert all(r is not None for r in results[0][:5])


def test_gather_matches_naive_in_fp64():
    """fp64 (gradient checks) through every CPU branch: the causal prefix, the union chunks and the window's
    band kernels on the fused CPU flash kernel, whose log-sum-exp must stay fp64. 1e-6: that kernel's exp
    is a fast approximation (~1e-7 relative) even in fp64."""
    H, kv, D, E, S = 4, 2, 8, 16, 40
    ref, fast = _module("naive", H, kv, D, E).double(), _module("gather", H, kv, D, E).double()
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, H, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv, S, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    x = torch.randn(2, S, E, generator=g, dtype=torch.float64)
    go = torch.randn(2, H, S, D, generator=g, dtype=torch.float64)
    results = []
    for m in (ref, fast):
        o = m(q, k, v, AttentionBatch(x_BSE=x))
        results.append((o, *torch.autograd.grad(o, [q, k, v], go)))
    for name, a, b in zip(["o", "dq", "dk", "dv"], *results):
        assert b.dtype == torch.float64
        assert_rel(name, a, b, 1e-6)


def test_selection_rules():
    geo = NSAGeometry(4, 2, 4, n_select=3, n_local=1, window=4)
    S, H, kv = 40, 4, 2
    n_c = geo.n_compressed(S)
    p = torch.rand(1, H, S, n_c)
    idx, ok = select_blocks(geo, p, kv, S, S)
    t_blk = torch.arange(S) // 4
    for t in range(S):
        chosen = set(idx[0, 0, t][ok[0, 0, t]].tolist())
        assert 0 in chosen and int(t_blk[t]) in chosen  # initial and own (local) block forced
        assert max(chosen) <= t_blk[t]  # never a future block
        assert len(chosen) == min(3, int(t_blk[t]) + 1)
    # heads of a GQA group share one selection: it is computed per KV head
    assert idx.shape[1] == kv


def test_options_are_validated():
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, model_dim=16)
    with pytest.raises(ConfigError, match="compress_stride"):
        build_attention("nsa", {"compress_block": 5, "compress_stride": 2}, ctx)
    with pytest.raises(ConfigError, match="n_select"):
        build_attention("nsa", {"n_select": 2, "n_local": 2}, ctx)


def test_nsa_model_trains_and_starts_as_mean_pooling():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      attention=[{"name": "nsa", "options": OPTS}])
    model = Transformer(cfg)
    core = model.layers[0].attention.core_attention
    assert torch.all(core.gate.weight == 0) and torch.allclose(core.compress_k[0, :8], torch.eye(8) / 4)
    losses = train_tiny(model)
    assert losses[-1] < losses[0]
    assert core.compress_k.grad is not None and core.gate.weight.grad.abs().max() > 0
