"""Every sparse variant declares the share of causal (query, key) pairs it reads (``attn_kept_fraction``,
MFU, the planner): NSA and NOSA by their per-query token budget."""

from __future__ import annotations

import pytest
from longshard.models.attention.registry import budget_kept_fraction


@pytest.mark.parametrize("seq_len,budget", [(1, 4), (7, 3), (64, 64), (100, 17), (4096, 1408)])
def test_budget_kept_fraction_counts_the_pairs(seq_len, budget):
    kept = sum(min(t + 1, budget) for t in range(seq_len))
    assert budget_kept_fraction(seq_len, budget) == pytest.approx(kept / (seq_len * (seq_len + 1) / 2), rel=1e-12)


@pytest.mark.parametrize("name,options,budget", [
    # NSA: window 64 covers the 2 local blocks of 16; 4 more selected blocks of 16 -> 64 + 64 tokens
    ("nsa", {"compress_block": 16, "compress_stride": 8, "select_block": 16, "n_select": 6, "n_local": 2,
             "window": 64}, 128),
    # NSA: 4 local blocks of 32 exceed a window of 16 -> 128 + 2 x 32
    ("nsa", {"compress_block": 16, "compress_stride": 8, "select_block": 32, "n_select": 6, "n_local": 4,
             "window": 16}, 192),
    # NOSA: 1 sink + 2 local + 4 query + 4 static blocks of 16
    ("nosa", {"block": 16}, 11 * 16),
])
def test_nsa_and_nosa_declare_their_kept_fraction(name, options, budget):
    from longshard.models.model import Transformer
    from longshard.train.config import load_config

    cfg = load_config("tiny_lm", [f"model.attention=[{{name: {name}, options: {options}}}]", "model.n_layers=1"])
    core = Transformer(cfg.model).layers[0].attention.core_attention
    assert core.kept_fraction(budget) == 1.0  # a prefix within the budget is read whole
    for seq_len in (1024, 4096):
        assert core.kept_fraction(seq_len) == pytest.approx(budget_kept_fraction(seq_len, budget), rel=1e-12)
        assert core.kept_fraction(seq_len) < 0.5


@pytest.mark.parametrize("heads,message", [
    ([2], r"KV head 2 does not exist \(the layer has 2 KV heads; retrieval_heads counts KV heads, each with its 3 "
          r"query heads\)"),
    ([0, 0], r"\[0, 0\] lists a KV head twice"),
])
def test_retrieval_heads_are_kv_heads_and_validated_as_such(heads, message):
    from longshard.errors import ConfigError
    from longshard.models.model import Transformer
    from longshard.train.config import load_config

    cfg = load_config("tiny_lm", [f"model.attention=[{{name: streaming, options: {{retrieval_heads: {heads}}}}}]",
                                     "model.n_layers=1"])  # 6 query heads, 2 KV heads
    with pytest.raises(ConfigError, match=r"model\.attention\[0\]\.options\.retrieval_heads: " + message):
        Transformer(cfg.model)
