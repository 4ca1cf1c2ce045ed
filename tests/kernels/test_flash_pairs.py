"""flash-attn in the ring (forward/backward with the log-sum-exp per step, as ring-flash-attn runs it) and
as the dense CUDA path, checked on CPU through stand-ins with flash-attn's internal signatures (2.6+ and
the older 8-value form) that compute with the naive specification and round like flash-attn (outputs
and gradients in the input dtype): the layout (B, S, heads, D), GQA, the merged statistics reaching the
backward, which pairs go to the fallback (packed documents, fp32) and the backend selection. On a GPU
with flash-attn installed the last test runs the real kernels against the specification
(`benchmarks/gpu_check.sh` runs this file)."""

from __future__ import annotations

import copy
import importlib.machinery
import sys
import types

import pytest
import torch
from helpers import assert_rel
from longshard.kernels.attention import flash_pairs
from longshard.kernels.attention.flash_pairs import FlashAttnPairs
from longshard.kernels.attention.fused_cpu import merge_partials
from longshard.kernels.attention.pairs import CpuPairs, pair_attention_naive, pair_backward_naive, pair_kernel

# bf16: the stand-in (like flash-attn) returns outputs and gradients rounded to bf16 (8-bit mantissa,
# relative 2^-9 per value); merging and summing in fp32 keep that order: 1e-2 leaves margin.
TOL_BF16 = 1e-2


def _stand_in(new_api: bool = True) -> types.ModuleType:
    """A module with flash-attn's ``_flash_attn_forward`` / ``_flash_attn_backward`` (by signature) whose
    bodies are the naive specification; it checks what flash-attn requires and counts calls."""
    mod = types.ModuleType("flash_attn.flash_attn_interface")
    mod.calls = {"fwd": 0, "bwd": 0}

    def check(q, k, dropout_p, window, softcap):
        assert q.dim() == 4 and q.shape[2] % k.shape[2] == 0, "layout (B, S, heads, D), GQA by heads"
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
        assert dropout_p == 0.0 and tuple(window) == (-1, -1) and softcap == 0.0

    def fwd(q, k, v, dropout_p, softmax_scale, causal, window, softcap):
        check(q, k, dropout_p, window, softcap)
        mod.calls["fwd"] += 1
        o, lse = pair_attention_naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale, causal)
        return o.transpose(1, 2).to(q.dtype), lse

    def bwd(dout, q, k, v, out, lse, dq, dk, dv, dropout_p, softmax_scale, causal, window, softcap):
        check(q, k, dropout_p, window, softcap)
        assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.is_contiguous()
        mod.calls["bwd"] += 1
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # flash-attn forms it from out
        g = pair_backward_naive(*(t.transpose(1, 2) for t in (dout, q, k, v)), lse, delta, softmax_scale, causal)
        for buf, grad in zip((dq, dk, dv), g):
            buf.copy_(grad.transpose(1, 2))
        return delta

    if new_api:
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                                softcap, alibi_slopes, return_softmax):
            o, lse = fwd(q, k, v, dropout_p, softmax_scale, causal, (window_size_left, window_size_right), softcap)
            return o, lse, None, None

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                                 rng_state=None):
            return bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                       (window_size_left, window_size_right), softcap)
    else:  # flash-attn 2.5: window_size as one tuple, 8 values back from the forward
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                return_softmax):
            o, lse = fwd(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap)
            return o, q, k, v, o, lse, None, None

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size, softcap, alibi_slopes, deterministic, rng_state=None):
            return bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
                       softcap)

    mod._flash_attn_forward, mod._flash_attn_backward = _flash_attn_forward, _flash_attn_backward
    return mod


def _rand(*shape, seed, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()


@pytest.mark.parametrize("new_api", [True, False])
def test_pairs_merge_to_one_attention_through_flash_attn(new_api):
    """A query chunk over a visible and its own (causal) key chunk: flash-attn's two partials merged by
    log-sum-exp, each backward from the merged statistics, equal one attention (fp32 reference)."""
    stub = _stand_in(new_api)
    B, H, K, n, D = 2, 4, 2, 11, 16
    scale = D ** -0.5
    ops = FlashAttnPairs(scale, CpuPairs(scale), interface=stub)
    q = _rand(B, H, n, D, seed=1)
    k1, v1, k2, v2 = (_rand(B, K, n, D, seed=s) for s in (2, 3, 4, 5))
    o1, l1 = ops.forward(q, k1, v1, False)
    o2, l2 = ops.forward(q, k2, v2, True)
    o, lse = merge_partials(o1, l1, o2, l2)
    keep = torch.cat([torch.ones(n, n, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
    from longshard.kernels.attention.naive import attention_naive

    ref = attention_naive(q.float(), torch.cat([k1, k2], 2).float(), torch.cat([v1, v2], 2).float(),
                          keep[None, None], scale)
    assert_rel("merged output", ref, o, TOL_BF16)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(9))
    ref.backward(do)
    delta = (do.bfloat16().float() * o.bfloat16().float()).sum(-1)
    g1 = ops.backward(do.bfloat16(), q, k1, v1, o.bfloat16(), lse, delta, False)
    g2 = ops.backward(do.bfloat16(), q, k2, v2, o.bfloat16(), lse, delta, True)
    assert stub.calls == {"fwd": 2, "bwd": 2} and all(g.dtype == torch.float32 for g in (*g1, *g2))
    assert_rel("dq", q.grad, g1[0] + g2[0], TOL_BF16)
    for g, t, name in ((g1[1], k1, "dk1"), (g1[2], v1, "dv1"), (g2[1], k2, "dk2"), (g2[2], v2, "dv2")):
        assert_rel(name, t.grad, g, TOL_BF16)


def test_pairs_flash_attn_cannot_take_go_to_the_fallback():
    """Packed documents and fp32 inputs are the fallback's (flash-attn has no per-token mask, no fp32)."""
    stub = _stand_in()
    ops = FlashAttnPairs(0.25, CpuPairs(0.25), interface=stub)
    q, k, v = _rand(1, 2, 8, 16, seed=1), _rand(1, 2, 8, 16, seed=2), _rand(1, 2, 8, 16, seed=3)
    doc = torch.zeros(1, 8, dtype=torch.long)
    ops.forward(q, k, v, True, doc, doc)
    ops.forward(q.float(), k.float(), v.float(), True)
    assert stub.calls["fwd"] == 0
    assert not FlashAttnPairs.takes(torch.zeros(1, 1, 4, 12, dtype=torch.bfloat16), None)  # head dim not by 8


def test_one_rank_ring_through_flash_attn_equals_the_fused_cpu_ring():
    """The whole ring (one rank: three chunk pairs per layer, merged) in bf16 with flash-attn's pairs
    gives the losses and every gradient of the ring on PyTorch's fused CPU kernel; with packed documents
    the pairs fall back and the two agree too."""
    import torch.distributed as dist
    from longshard.models import ModelConfig, Transformer
    from longshard.parallel.ring import apply_ring

    fresh = not dist.is_initialized()
    if fresh:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        base = Transformer(ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                       max_seq_len=64)).to(torch.bfloat16)
        stub = _stand_in()
        tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
        for doc in (None, torch.cumsum((torch.arange(24) % 9 == 8).long(), 0)[None].expand(2, 24)):
            runs = []
            for use_flash in (False, True):
                ring = apply_ring(copy.deepcopy(base), dist.group.WORLD)
                if use_flash:
                    for layer in ring.layers:
                        core = layer.attention.core_attention
                        core._ops["cpu"] = FlashAttnPairs(core.softmax_scale, CpuPairs(core.softmax_scale), stub)
                out = ring(tokens, doc_ids_BS=doc, labels_BS=tokens)
                out.loss_sum.backward()
                runs.append((out.loss_sum.float().detach(), [p.grad.float() for p in ring.parameters()]))
            assert_rel("loss", runs[0][0], runs[1][0], TOL_BF16)
            for (name, _), a, b in zip(base.named_parameters(), runs[0][1], runs[1][1], strict=True):
                assert_rel(name, a, b, 3e-2)  # bf16 parameters' gradients: two roundings of 2^-9 each, summed
            assert stub.calls == {"fwd": 6, "bwd": 6}  # 2 layers x 3 pairs; with documents: all fell back
    finally:
        if fresh:
            dist.destroy_process_group()


def test_backend_selection(monkeypatch):
    """``flash_attn`` is chosen only where it runs; forcing it without the package names the install."""
    monkeypatch.setattr(flash_pairs, "flash_attn_installed", lambda: False)
    with pytest.raises(ValueError, match="flash-attn package is not installed.*no-build-isolation"):
        pair_kernel(torch.device("cpu"), 0.5, "flash_attn")
    stub = _stand_in()
    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", stub)
    monkeypatch.setattr(flash_pairs, "flash_attn_installed", lambda: True)
    ops = pair_kernel(torch.device("cpu"), 0.5, "flash_attn")
    assert isinstance(ops, FlashAttnPairs) and isinstance(ops.fallback, CpuPairs) and ops.fa is stub
    assert isinstance(pair_kernel(torch.device("cpu"), 0.5, "auto"), CpuPairs)  # never on CPU by itself


def test_dense_flash_backend_through_a_stand_in(monkeypatch):
    """The dense core's flash path (flash_attn_func, and flash_attn_varlen_func for packed documents) on a
    stand-in computing with SDPA: the layout and the cumulative document lengths give the sdpa result."""
    import torch.nn.functional as F
    from longshard.models.attention import AttentionBatch, AttentionContext, build_attention

    seen = []

    def flash_attn_func(q, k, v, softmax_scale, causal):
        seen.append("func")
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal,
                                           scale=softmax_scale, enable_gqa=True)
        return o.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        seen.append("varlen")
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            assert b - a <= max_q
            out[a:b] = flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal)[0]
        return out

    package = types.ModuleType("flash_attn")
    package.flash_attn_func, package.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8)
    flash = build_attention("dense", {"backend": "flash"}, ctx)
    sdpa = build_attention("dense", {"backend": "sdpa"}, ctx)
    q = _rand(2, 4, 19, 8, seed=1, dtype=torch.float32)
    k, v = (_rand(2, 2, 19, 8, seed=s, dtype=torch.float32) for s in (2, 3))
    doc = torch.tensor([[0] * 7 + [1] * 12, [0] * 19])
    for d in (None, doc):
        assert_rel("flash vs sdpa", sdpa(q, k, v, AttentionBatch(doc_ids_BS=d)),
                   flash(q, k, v, AttentionBatch(doc_ids_BS=d)), 1e-6)  # the same SDPA sums
    assert seen[0] == "func" and "varlen" in seen


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and flash_pairs.flash_attn_installed()),
                    reason="needs a GPU with flash-attn installed (benchmarks/gpu_check.sh runs it there)")
def test_real_flash_attn_pairs_match_the_specification():
    """bf16 on CUDA, flash-attn itself: each pair and the backward from merged statistics (1e-2)."""
    B, H, K, n, D = 2, 8, 2, 256, 128
    scale = D ** -0.5
    ops = pair_kernel(torch.device("cuda"), scale, "auto")
    assert isinstance(ops, FlashAttnPairs)
    q = _rand(B, H, n, D, seed=1).cuda().detach()
    k, v = (_rand(B, K, n, D, seed=s).cuda().detach() for s in (2, 3))
    for causal in (False, True):
        o, lse = ops.forward(q, k, v, causal)
        o_ref, lse_ref = pair_attention_naive(q, k, v, scale, causal)
        assert_rel("output", o_ref, o, TOL_BF16)
        assert_rel("log-sum-exp", lse_ref, lse, TOL_BF16)
        do = torch.randn_like(o)
        delta = (do.bfloat16().float() * o.bfloat16().float()).sum(-1)
        got = ops.backward(do.bfloat16(), q, k, v, o.bfloat16(), lse, delta, causal)
        want = pair_backward_naive(do.bfloat16(), q, k, v, lse, delta, scale, causal)
        for name, a, b in zip(("dq", "dk", "dv"), want, got):
            assert_rel(name, a, b, TOL_BF16)
