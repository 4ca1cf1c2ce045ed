"""Honest accounting: throughput/MFU count the attention FLOPs each variant actually performs."""

from __future__ import annotations

import pytest
import torch
from longshard.models import ModelConfig, Transformer
from longshard.train.metrics import flops_per_token

CFG = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=8192)
S2 = {"name": "s2", "options": {"block": 16, "local_blocks": 2, "vert_stride": 2}}


def _attn_term(attention, S: int) -> float:
    """The attention share of the training FLOPs per token (the 6N term removed)."""
    cfg = ModelConfig(**CFG, attention=attention)
    return flops_per_token(cfg, S, Transformer(cfg)) - flops_per_token(cfg, S, None) + 6 * 2 * 4 * 16 * S


def test_dense_matches_the_closed_form():
    cfg = ModelConfig(**CFG)
    S = 1024
    # per layer: 3 x 4 x H x D x (S + 1) / 2 = 6 L H D (S + 1); the closed form counts 6 L H D S
    assert flops_per_token(cfg, S, Transformer(cfg)) - flops_per_token(cfg, S) == pytest.approx(
        6 * 2 * 4 * 16, rel=1e-9)


def test_sparse_counts_kept_blocks_and_linear_is_flat_in_s():
    S = 2048
    dense = _attn_term([{"name": "dense"}], S)
    model = Transformer(ModelConfig(**CFG, attention=[S2]))
    kept = model.layers[0].attention.core_attention.pattern(S // 16, torch.device("cpu")).kept_fraction()
    assert _attn_term([S2], S) == pytest.approx(kept * dense, rel=1e-9)
    assert _attn_term([S2], S) < 0.6 * dense
    lin = [{"name": "linear", "options": {"chunk": 64}}]
    assert _attn_term(lin, 2048) == _attn_term(lin, 8192)  # chunk + state: no S term
    assert _attn_term(lin, 8192) < 0.1 * _attn_term([{"name": "dense"}], 8192)
    # hybrid layers (dense every 2nd) and head groups add up
    hybrid = {**S2, "options": {**S2["options"], "dense_every_n_layers": 2}}
    assert _attn_term([hybrid], S) == pytest.approx((dense + kept * dense) / 2, rel=1e-9)
    mixed = [{"name": "mixed", "options": {"groups": [{"name": "dense", "heads": 2}, {**S2, "heads": 2}]}}]
    assert _attn_term(mixed, S) < dense
    nosa = [{"name": "nosa", "options": {"block": 16}}]
    assert _attn_term(nosa, 8192) == _attn_term(nosa, 4096)  # a fixed block budget per query


def test_torchtitan_count_is_its_formula_on_llama3_8b_and_twice_our_dense_attention_term():
    """`mfu_pct` uses torchtitan's count: 6 x (params without the input embedding) + 12·L·H·D·S. On Llama-3-8B
    (32 layers, 32/8 heads of 128, FFN 14336, vocab 128256) at 8192 tokens that is 6 x 7.50e9 + 12·32·32·128·8192;
    its attention term is twice our dense one (the full S x S product against our causal half)."""
    from longshard.train.metrics import flops_per_token_torchtitan

    cfg = ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336,
                      max_seq_len=8192)
    S = 8192
    per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336 + 2 * 4096  # q,o + k,v + SwiGLU + 2 norms
    n = 32 * per_layer + 4096 + 128256 * 4096  # + final norm + output projection (untied)
    assert flops_per_token_torchtitan(cfg, S) == 6 * n + 12 * 32 * 32 * 128 * S
    ours_attention = flops_per_token(cfg, S) - 6 * n
    assert flops_per_token_torchtitan(cfg, S) - 6 * n == 2 * ours_attention
