"""DMA in its published form against the reference code as written: transformers' ``DogeAttention``
(the flash-dmattn authors' model) runs its own forward on a random layer, and longshard's DMA with
``dt_proj: full`` (+ bias), ``bias_fn: exp_a_softplus`` and ``keep_own_block: false`` at ``block: 1`` gives
the same output and the same gradients of the input, ``A`` and ``dt_proj`` (taken by name with
``load_reference_weights``), on the naive and the gather path, GQA, fp32; longshard's default form
against its own definition stays in test_dma.py. Also: the documented tie rule (equal scores keep the
earlier key / block), the options' checks, and the full projection refused on a slice of the heads."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_rel
from longshard.errors import ConfigError
from longshard.kernels.dma import dma_attention_gather, dma_attention_naive, select_key_blocks
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
from longshard.train.config import load_config

B, S, H, K, D, W = 2, 23, 4, 2, 8, 6  # W: the reference's keep_window_size (keys each query keeps)


def _doge_layer():
    doge = pytest.importorskip("transformers.models.doge.modeling_doge")
    from transformers import DogeConfig

    cfg = DogeConfig(vocab_size=32, hidden_size=H * D, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=H, num_key_value_heads=K, attention_bias=True, keep_window_size=W)
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    layer = doge.DogeAttention(cfg, layer_idx=0).eval()
    with torch.no_grad():  # A = 0 at init there: random values so the bias matters and nothing ties
        layer.A.copy_(torch.tensor([0.7, -0.4]))
        layer.dt_proj.weight.normal_(0.0, 0.5)
        layer.dt_proj.bias.normal_(0.0, 0.5)
    rope = doge.DogeRotaryEmbedding(cfg)
    return doge, cfg, layer, rope


@pytest.mark.parametrize("path", ["naive", "gather"])
def test_published_form_matches_transformers_doge_attention(path):
    """fp32, 2e-5: the same sums in another order (the reference adds finfo.min where we drop keys, which
    exp turns into exactly 0); the bias is exp(A softplus(dt)) of magnitude ~1-3, so logits agree to ~1e-6."""
    doge, cfg, ref_layer, rope = _doge_layer()
    x = torch.randn(B, S, H * D, generator=torch.Generator().manual_seed(4))
    pos = torch.arange(S)[None].expand(B, S)
    cos, sin = rope(x, pos)
    causal = torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None].expand(B, 1, S, S)

    x_ref = x.clone().requires_grad_()
    out_ref, _ = ref_layer(x_ref, (cos, sin), attention_mask=causal)
    (out_ref * torch.linspace(-1, 1, out_ref.numel()).view_as(out_ref)).sum().backward()

    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=K, head_dim=D)
    core = build_attention("dma", {"dt_proj": "full", "dt_bias": True, "bias_fn": "exp_a_softplus",
                                   "keep_own_block": False, "block": 1, "keep_blocks": W, "path": path}, ctx)
    core.load_reference_weights(ref_layer.state_dict())
    x_ours = x.clone().requires_grad_()
    shape = (B, S, -1, D)
    # the reference layer's own projections, norms and rotation; only the attention core is ours
    q = ref_layer.q_norm(ref_layer.q_proj(x_ours).view(shape)).transpose(1, 2)
    k = ref_layer.k_norm(ref_layer.k_proj(x_ours).view(shape)).transpose(1, 2)
    v = ref_layer.v_proj(x_ours).view(shape).transpose(1, 2)
    q, k = doge.apply_rotary_pos_emb(q, k, cos, sin)
    o = core(q, k, v, AttentionBatch())
    out = ref_layer.o_proj(o.transpose(1, 2).reshape(B, S, H * D))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()

    assert_rel("out", out_ref, out, 2e-5)
    assert_rel("dx", x_ref.grad, x_ours.grad, 2e-5)
    assert_rel("dA", ref_layer.A.grad, core.a.grad, 2e-5)
    assert_rel("d dt_proj.weight", ref_layer.dt_proj.weight.grad, core.delta.grad, 2e-5)
    assert_rel("d dt_proj.bias", ref_layer.dt_proj.bias.grad, core.dt_bias.grad, 2e-5)
    # longshard's own rule on the same layer is a different model (its own key forced in): not equal
    own = build_attention("dma", {"dt_proj": "full", "dt_bias": True, "bias_fn": "exp_a_softplus", "block": 1,
                                  "keep_blocks": W, "path": path}, ctx)
    own.load_reference_weights(ref_layer.state_dict())
    assert (own(q, k, v, AttentionBatch()) - o).abs().max() > 1e-3


@pytest.mark.parametrize("packed", [False, True])
def test_published_form_gather_matches_naive_with_every_gradient(packed):
    """The gather path against the naive reference with the full projection, its bias, the exp bias and
    per-key top-w. fp32, 1e-5 for the output and dq/dk/dv (another summation order, ~2e-7); 1e-4 for A and
    dt_proj's weight and bias: each is a sum over every key of that key's dS column sum, where flash
    attention's dS = P (dP - rowsum(dO O)) cancels to ~1e-3 of its terms (observed 2e-5 to 6e-5)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, 37, D, generator=g).requires_grad_()
    k, v = (torch.randn(B, K, 37, D, generator=g).requires_grad_() for _ in range(2))
    a = (torch.randn(K, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(K, K * D, generator=g) * 0.3).requires_grad_()
    bias = torch.randn(K, generator=g).requires_grad_()
    doc = (torch.arange(37)[None] >= torch.tensor([[12], [20]])).long() if packed else None
    results = []
    for fn in (dma_attention_naive, dma_attention_gather):
        out = fn(q, k, v, a, w, 1, 5, 1 / math.sqrt(D), doc, dt_bias_K=bias, exp_bias=True, keep_own=False)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        leaves = (q, k, v, a, w, bias)
        results.append((out.detach(), [t.grad.clone() for t in leaves]))
        for t in leaves:
            t.grad = None
    (o_ref, g_ref), (o, g_out) = results
    assert_rel("out", o_ref, o, 1e-5)
    for name, x, y, tol in zip(("dq", "dk", "dv", "dA", "dW", "db"), g_ref, g_out, (1e-5,) * 3 + (1e-4,) * 3):
        assert_rel(name, x, y, tol)


def test_tie_rule_keeps_the_earlier_candidates():
    """With A = 0 every score ties: the earliest candidates are kept (stable sort), per key and per block."""
    zero = torch.zeros(1, 1, 10)
    idx, ok, _ = select_key_blocks(zero, 1, 3, 10, 10, keep_own=False)
    assert idx[0, 0, 9].tolist() == [0, 1, 2] and ok[0, 0, 9].all()  # query 9 keeps keys 0-2, not itself
    assert idx[0, 0, 1].tolist()[:2] == [0, 1] and ok[0, 0, 1].tolist() == [True, True, False]
    idx, ok, _ = select_key_blocks(zero, 2, 3, 10, 10)  # blocks of 2: its own block plus blocks 0 and 1
    assert idx[0, 0, 4].tolist() == [0, 1, 4]
    scores = torch.tensor([[[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]]])  # ties among the higher ones: earlier first
    idx, _, _ = select_key_blocks(scores, 1, 2, 6, 6, keep_own=False)
    assert idx[0, 0, 5].tolist() == [1, 2]


def test_options_are_checked_and_the_full_projection_stays_whole():
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8)
    with pytest.raises(ConfigError, match="keep_own_block.*needs block: 1"):
        build_attention("dma", {"keep_own_block": False}, ctx)
    with pytest.raises(ConfigError, match="dt_bias.*only the full dt_proj"):
        build_attention("dma", {"dt_bias": True}, ctx)
    with pytest.raises(ConfigError, match="bias_fn"):
        build_attention("dma", {"bias_fn": "exp"}, ctx)
    core = build_attention("dma", {"dt_proj": "full"}, ctx)
    assert tuple(core.delta.shape) == (2, 16) and core.dt_bias is None
    with pytest.raises(ValueError, match="dt_proj.bias"):  # the reference has a bias this layer lacks
        core.load_reference_weights({"A": torch.zeros(2), "dt_proj.weight": torch.zeros(2, 16),
                                     "dt_proj.bias": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"dt_proj.weight.*\(2, 8\).*use dt_proj: full"):
        build_attention("dma", {}, ctx).load_reference_weights({"A": torch.zeros(2),
                                                                 "dt_proj.weight": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="every KV head"):
        core.set_head_slice(0, 2)
    with pytest.raises(ConfigError, match="every KV head's values"):  # Ulysses refused before any work
        load_config("quickstart", ["model.attention=[{name: dma, options: {dt_proj: full}}]",
                                   "parallel.sp_mode=ulysses"])
