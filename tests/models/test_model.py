"""Model: attention backends agree, packed documents never attend across, registry, RoPE."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_rel
from longshard.errors import ConfigError
from longshard.kernels.attention.naive import attention_naive, causal_doc_mask
from longshard.models import ModelConfig, Transformer, positions_from_docs
from longshard.models.attention import (
    AttentionBatch,
    AttentionContext,
    CoreAttention,
    available_attention,
    build_attention,
    register_attention,
)
from longshard.models.attention.registry import AttentionOptions
from longshard.models.config import RopeConfig
from longshard.models.rope import rope_inv_freq

# fp32 SDPA vs an explicit fp32 softmax: same math, different reduction order -> ~1e-6.
TOL_FP32 = 2e-5


def _ctx(h=4, kv=2, d=16):
    return AttentionContext(layer_idx=0, n_layers=1, n_heads=h, n_kv_heads=kv, head_dim=d)


@pytest.mark.parametrize("S", [1, 17, 64])
@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("packed", [False, True])
def test_dense_backends_match_naive(S, kv, packed):
    torch.manual_seed(1)
    B, H, D = 2, 4, 16
    q = torch.randn(B, H, S, D, requires_grad=True)
    k = torch.randn(B, kv, S, D, requires_grad=True)
    v = torch.randn(B, kv, S, D, requires_grad=True)
    doc = None
    if packed:
        doc = torch.cumsum((torch.rand(B, S) < 0.15).long(), 1)
    batch = AttentionBatch(doc_ids_BS=doc)
    ref_mod = build_attention("dense", {"backend": "naive"}, _ctx(H, kv, D))
    sdpa_mod = build_attention("dense", {"backend": "sdpa"}, _ctx(H, kv, D))
    go = torch.randn(B, H, S, D)
    outs = {}
    for name, mod in (("naive", ref_mod), ("sdpa", sdpa_mod)):
        o = mod(q, k, v, batch)
        grads = torch.autograd.grad(o, (q, k, v), go)
        outs[name] = (o, *grads)
    for i, label in enumerate(["o", "dq", "dk", "dv"]):
        assert_rel(label, outs["naive"][i], outs["sdpa"][i], TOL_FP32)


def test_naive_matches_explicit_formula():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    mask = causal_doc_mask(5, 5)
    s = (q @ k.transpose(-1, -2)) / 8**0.5
    s = s.masked_fill(~mask, float("-inf"))
    ref = torch.softmax(s, -1) @ v
    assert_rel("o", ref, attention_naive(q, k, v, mask).double(), 1e-6)  # naive computes in fp32


def _tiny(**kw):
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_packed_documents_do_not_attend_across(backend):
    """A packed row equals running each document alone (positions restart per document)."""
    torch.manual_seed(3)
    model = Transformer(_tiny(attention=[{"name": "dense", "options": {"backend": backend}}])).eval()
    lens = [5, 9, 1, 16]
    docs = [torch.randint(0, 64, (n,)) for n in lens]
    tokens = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    with torch.no_grad():
        packed = model(tokens, doc_ids_BS=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        unmasked = model(tokens)[0]
    assert_rel("packed logits", alone, packed, TOL_FP32)
    # the mask matters: without it later documents see earlier ones
    assert (unmasked[lens[0]:] - alone[lens[0]:]).abs().max() > 1e-3


def test_positions_restart_per_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_from_docs(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_num_params_matches_model():
    for kw in ({}, {"tie_embeddings": True}, {"qkv_bias": True, "qk_norm": True}):
        cfg = _tiny(**kw)
        assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params()


def test_registry_errors_list_valid_names():
    with pytest.raises(ConfigError, match="use one of: .*dense"):
        build_attention("nope", {}, _ctx())
    assert "dense" in available_attention()


@dataclass(kw_only=True)
class _ScaledOpts(AttentionOptions):
    factor: float = 1.0


@register_attention("test_scaled_dense", _ScaledOpts)
class _ScaledDense(CoreAttention):
    """A toy variant registered by the test: dense attention times a constant."""

    def __init__(self, ctx, opts):
        super().__init__(ctx, opts)
        self.factor = opts.factor

    def forward(self, q, k, v, batch):
        mask = causal_doc_mask(q.shape[2], k.shape[2], batch.doc_ids_BS, q.device)
        return attention_naive(q, k, v, mask) * self.factor


def test_new_variant_is_one_registration_and_mixes_per_layer():
    cfg = _tiny(attention=[{"name": "dense"}, {"name": "test_scaled_dense", "options": {"factor": 0.0}}])
    model = Transformer(cfg)
    assert type(model.layers[1].attention.core_attention).__name__ == "_ScaledDense"
    tokens = torch.randint(0, 64, (1, 9))
    model(tokens).sum().backward()  # trainable end to end
    assert model.layers[1].attention.wo.weight.grad.abs().max() == 0  # factor 0 -> no signal through layer 1


@pytest.mark.parametrize("mode", ["full", "attention_boundary"])
def test_activation_checkpointing_same_grads(mode):
    torch.manual_seed(4)
    cfg = _tiny(attention=[{"name": "dense", "gate": "headwise"}])
    a, b = Transformer(cfg), Transformer(cfg)
    b.load_state_dict(a.state_dict())
    b.set_activation_checkpointing(mode)
    tokens = torch.randint(0, 64, (2, 13))
    a(tokens).square().mean().backward()
    b(tokens).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert_rel(n, pa.grad, pb.grad, 1e-6)  # recomputation repeats identical fp32 ops


def test_attention_boundary_never_recomputes_core_attention():
    calls = {"n": 0}

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            calls["n"] += 1
            return self.inner(*args)

    for mode, expect in (("full", 4), ("attention_boundary", 2)):  # 2 layers; full recomputes each
        model = Transformer(_tiny())
        for layer in model.layers:
            layer.attention.core_attention = Counting(layer.attention.core_attention)
        model.set_activation_checkpointing(mode)
        calls["n"] = 0
        model(torch.randint(0, 64, (1, 9))).sum().backward()
        assert calls["n"] == expect, (mode, calls["n"])


def test_rope_scalings_extend_wavelengths():
    base, _ = rope_inv_freq(RopeConfig(), 64)
    lin, _ = rope_inv_freq(RopeConfig(scaling="linear", factor=4), 64)
    assert_rel("linear", base / 4, lin, 1e-7)
    ntk, _ = rope_inv_freq(RopeConfig(scaling="ntk", factor=4), 64)
    assert torch.isclose(ntk[0], base[0]) and ntk[-1] < base[-1]  # highest frequency kept, lowest stretched
    yarn, scale = rope_inv_freq(RopeConfig(scaling="yarn", factor=4, original_max_seq_len=256), 64)
    assert scale == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert torch.isclose(yarn[0], base[0]) and torch.isclose(yarn[-1], base[-1] / 4)
