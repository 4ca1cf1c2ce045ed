"""Prefill/decode consistency: the whole sequence at once equals prefix + token-by-token decoding."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.models import InferenceCache, ModelConfig, Transformer

# the full pass uses SDPA/gather paths, decoding the naive masks: fp32 reorderings ~1e-6.
TOL = 2e-5

VARIANTS = {
    "dense": [{"name": "dense"}],
    "dense-gated-headwise": [{"name": "dense", "gate": "headwise"}],
    "s2-gated-elementwise": [{"name": "s2", "options": {"block": 4, "local_blocks": 1, "vert_stride": 2},
                              "gate": "elementwise"}],
    "streaming": [{"name": "streaming", "options": {"block": 4, "sink": 2, "window": 5, "retrieval_heads": [1]}}],
    "streaming-learned": [{"name": "streaming_gated", "options": {"block": 4, "sink": 1, "window": 3}}],
    "sliding_window": [{"name": "sliding_window", "options": {"block": 4, "window": 6}}],
    "linear": [{"name": "linear", "options": {"chunk": 4}}],
    "nsa": [{"name": "nsa", "options": {"compress_block": 4, "compress_stride": 2, "select_block": 4,
                                        "n_select": 3, "n_local": 1, "window": 5}}],
    "nosa": [{"name": "nosa", "options": {"block": 4, "sink_blocks": 1, "local_blocks": 1, "query_blocks": 1,
                                          "static_blocks": 2}}],
    # a bias that matters (A = 0.5, Delta of unit scale): the decoding step must choose the same blocks
    "dma": [{"name": "dma", "options": {"block": 4, "keep_blocks": 2, "a_init": 0.5, "delta_std": 1.0}}],
    # routing from the layer input of each decoded token: the same heads as in the full forward
    "moh": [{"name": "moh", "options": {"shared_heads": 1, "top_k": 2, "router_std": 1.0}}],
    "based-hybrid": [{"name": "mixed", "options": {"groups": [
        {"name": "linear", "heads": 2, "options": {"chunk": 8, "feature_map": "elu1"}},
        {"name": "sliding_window", "heads": 2, "options": {"block": 4, "window": 4}}]}}],
    "mixed-per-layer": [{"name": "mixed", "options": {"groups": [
        {"name": "dense", "heads": 2}, {"name": "s2", "heads": 2, "options": {"block": 4, "local_blocks": 1}}]}},
        {"name": "sliding_window", "options": {"block": 4, "window": 4}}],
}


def _model(attention, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, attention=attention)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def _check(model, S=23, prefix=9):
    tokens = torch.randint(0, 64, (2, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = InferenceCache()
        parts = [model(tokens[:, :prefix], cache=cache)]
        for t in range(prefix, S):
            parts.append(model(tokens[:, t : t + 1], cache=cache))
    assert_rel("decode logits", full, torch.cat(parts, dim=1), TOL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_equals_decode(name):
    _check(_model(VARIANTS[name]))


def test_sqa_prefill_equals_decode_and_shapes():
    model = _model([{"name": "dense"}], n_heads=8, n_query_heads=4, n_kv_heads=2, dim=64)
    attn = model.layers[0].attention
    assert attn.wq.out_features == 4 * 8 and attn.wo.in_features == 4 * 8 and attn.wo.out_features == 64
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params()
    _check(model)


def test_gate_parameters_are_counted_and_trained():
    model = _model([{"name": "dense", "gate": "elementwise"}]).train()
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params()
    model(torch.randint(0, 64, (1, 7))).square().mean().backward()
    assert model.layers[0].attention.wg.weight.grad.abs().max() > 0
