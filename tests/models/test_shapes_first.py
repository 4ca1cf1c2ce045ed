"""Checks of shapes and sizes come before allocation; the planner plans from shapes."""

from __future__ import annotations

import json
import time

import pytest
import torch
from longshard.errors import ConfigError


def test_a_config_json_that_disagrees_with_the_weights_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from longshard.models import model as model_module
    from longshard.models.hf import check_hf_checkpoint

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    check_hf_checkpoint(tmp_path)
    built = []
    monkeypatch.setattr(model_module.Transformer, "__init__", lambda *a, **k: built.append(a))
    hf = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in [
        ("num_hidden_layers", 200_000, r"num_hidden_layers=200000, but its weights hold layers 0-1 \(2 in all\)"),
        ("vocab_size", 4096, r"vocab_size x hidden_size = 4096 x 32, but model\.embed_tokens\.weight is 64 x 32"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**hf, key: value}))
        with pytest.raises(ConfigError, match=message):
            check_hf_checkpoint(tmp_path)
    assert built == []


@pytest.mark.parametrize("overrides", [
    [],
    ["model.n_layers=5", "model.attention=[{name: s2, options: {dense_every_n_layers: 2, vert_stride: 4}}]"],
    ["model.n_layers=4", "model.attention=[{name: dense}, {name: nsa}, {name: dense, gate: elementwise}, "
                         "{name: linear}]"],
])
@pytest.mark.parametrize("tp", [1, 2])
def test_planning_from_one_layer_per_kind_counts_what_the_whole_model_holds(overrides, tp):
    from longshard.models.model import Transformer
    from longshard.train.config import load_config
    from longshard.train.plan import TP_SPLIT, _param_count

    mcfg = load_config("tiny_lm", overrides).model
    with torch.device("meta"):
        model = Transformer(mcfg)

    def local(named) -> float:
        return sum(p.numel() / (tp if any(k in n for k in TP_SPLIT) and n.split(".")[-2:] != ["wo", "bias"]
                                else 1) for n, p in named)

    whole = (local(model.named_parameters()), max(local(layer.named_parameters()) for layer in model.layers))
    assert _param_count(mcfg, tp) == whole


def test_a_huge_layer_count_plans_without_building_the_model():
    """200,000 layers: one meta layer per kind, not 200,000 (the bound is a hang guard, not a speed claim)."""
    from longshard.train.config import load_config
    from longshard.train.plan import _param_count

    mcfg = load_config("tiny_lm", ["model.n_layers=200000"]).model
    t0 = time.time()
    total, block = _param_count(mcfg, 1)
    assert time.time() - t0 < 60
    small_total, small_block = _param_count(load_config("tiny_lm", ["model.n_layers=2"]).model, 1)
    assert block == small_block and total == small_total + 199_998 * block
