"""Lightning (decayed linear) attention: blocked and recurrent forms against the quadratic reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel, train_tiny
from longshard.errors import ConfigError
from longshard.kernels.lightning import (
    lightning_attention_chunk,
    lightning_attention_naive,
    lightning_attention_recurrent,
)
from longshard.models import ModelConfig, Transformer
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
from longshard.models.attention.linear import decay_rates

# Blocked vs quadratic fp32: same sums regrouped per block, ~1e-7 relative; 1e-5 leaves margin for S=100.
TOL = 1e-5


def _inputs(B, H, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("S", [1, 17, 64, 100])
@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("packed", [False, True])
def test_chunk_matches_naive_with_grads(S, chunk, packed):
    q, k, v = _inputs(2, 3, S, 8, seed=S)
    a = torch.tensor([0.3, 0.05, 0.0])
    doc = None
    if packed:
        doc = torch.cumsum((torch.rand(2, S, generator=torch.Generator().manual_seed(2)) < 0.12).long(), 1)
    go = torch.randn(2, 3, S, 8, generator=torch.Generator().manual_seed(5))
    ref = lightning_attention_naive(q, k, v, a, doc)
    out, _ = lightning_attention_chunk(q, k, v, a, doc, chunk)
    g_ref = torch.autograd.grad(ref, (q, k, v), go)
    g_out = torch.autograd.grad(out, (q, k, v), go)
    assert_rel("o", ref, out, TOL)
    for name, r, o in zip(["dq", "dk", "dv"], g_ref, g_out):
        assert_rel(name, r, o, TOL)


def test_recurrent_equals_chunk_and_states_continue():
    q, k, v = _inputs(1, 2, 29, 4, seed=3)
    a = torch.tensor([0.2, 0.01])
    o_chunk, s_chunk = lightning_attention_chunk(q, k, v, a, chunk=8)
    o_rec, s_rec = lightning_attention_recurrent(q, k, v, a)
    assert_rel("o", o_chunk, o_rec, TOL)
    assert_rel("state", s_chunk, s_rec, TOL)
    # a sequence split in two, the second half continuing the first half's state
    o1, s1 = lightning_attention_chunk(q[:, :, :11], k[:, :, :11], v[:, :, :11], a, chunk=8)
    o2, s2 = lightning_attention_chunk(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], a, chunk=8, initial_state_BHDV=s1)
    assert_rel("split o", o_chunk, torch.cat([o1, o2], 2), TOL)
    assert_rel("split state", s_chunk, s2, TOL)


def test_split_across_document_boundary():
    q, k, v = _inputs(1, 2, 30, 4, seed=4)
    a = torch.tensor([0.1, 0.0])
    doc = torch.tensor([[0] * 12 + [1] * 18])
    ref = lightning_attention_naive(q, k, v, a, doc)
    for cut in (5, 12, 13):
        o1, s1 = lightning_attention_chunk(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], a, doc[:, :cut], 4)
        o2, _ = lightning_attention_chunk(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], a, doc[:, cut:], 4,
                                          initial_state_BHDV=s1, initial_doc_B=doc[:, cut - 1])
        assert_rel(f"cut {cut}", ref, torch.cat([o1, o2], 2), TOL)


def test_decay_schedule():
    a = decay_rates(8, 0, 4, "alibi")
    assert torch.all(a[:-1] > a[1:]) and a[0] == pytest.approx(2 ** -1) and a[-1] == pytest.approx(2 ** -8)
    top = decay_rates(8, 3, 4, "alibi_layer")
    assert torch.all(top < 1e-5)  # the last layer is (almost) undecayed
    assert torch.all(decay_rates(4, 0, 1, "none") == 0)


def test_module_paths_and_gqa():
    ctx = AttentionContext(layer_idx=0, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8)
    q, k, v = _inputs(2, 4, 21, 8)
    k, v = k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_()
    naive = build_attention("linear", {"path": "naive"}, ctx)
    chunk = build_attention("linear", {"path": "chunk", "chunk": 8}, ctx)
    b = AttentionBatch()
    assert_rel("module o", naive(q, k, v, b), chunk(q, k, v, b), TOL)
    with pytest.raises(ConfigError, match="feature_map"):
        build_attention("linear", {"feature_map": "relu2"}, ctx)


def test_linear_model_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=128,
                      attention=[{"name": "linear", "options": {"chunk": 8}}, {"name": "dense"}])
    model = Transformer(cfg)
    losses = train_tiny(model)
    assert losses[-1] < losses[0]
