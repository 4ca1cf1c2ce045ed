"""What a variant supports is declared on its options and module classes, and only there.

The options answer config validation (before anything is built); the module answers the parallel
wrappers, metrics and decoding. The two must agree, every registered variant is covered, and a
variant defined outside the package (one module, nothing else edited) is accepted by the ring.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from helpers import assert_rel, rel_err
from longshard.errors import ConfigError
from longshard.models import ModelConfig, Transformer
from longshard.models.attention import AttentionContext, available_attention, build_attention, parse_options
from longshard.models.attention.dense import DenseAttention, DenseOptions
from longshard.models.attention.registry import _REGISTRY, CP_FORMS, AttentionOptions, register_attention
from longshard.train.config import load_config

# small options for the (4 query / 2 KV heads, head dim 8) layer below; a variant not listed runs with its defaults
OPTIONS = {
    "dense": {},
    "linear": {"chunk": 4},
    "s2": {"block": 4, "local_blocks": 1, "vert_stride": 2},
    "streaming": {"block": 4, "sink": 1, "window": 2},
    "sliding_window": {"block": 4, "window": 8},
    "nsa": {"compress_block": 4, "compress_stride": 2, "select_block": 8, "n_select": 4, "window": 8},
    "nosa": {"block": 4},
    "power": {"block": 4, "local_blocks": 1},
    "mixed": {"groups": [{"name": "dense", "heads": 2}, {"name": "linear", "heads": 2, "options": {"chunk": 4}}]},
}
CTX = AttentionContext(layer_idx=0, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, model_dim=32)


SHIPPED = sorted(n for n in available_attention() if not n.startswith("test_"))  # tests register their own


@pytest.mark.parametrize("name", SHIPPED)
def test_options_and_module_agree(name):
    """Every registered variant, a new one included without touching this file (its defaults are used
    unless OPTIONS above gives smaller ones)."""
    options = OPTIONS.get(name, {})
    opts = parse_options(name, options)
    core = build_attention(name, options, CTX)
    form, inner = core.context_parallel_core()
    assert form == opts.context_parallel() and (form is None or form in CP_FORMS)
    assert (core.tensor_parallel_problem() is None) == (opts.tensor_parallel_problem() is None), \
        (core.tensor_parallel_problem(), opts.tensor_parallel_problem())
    assert opts.ring_seq_multiple(2) % 4 == 0  # two zigzag chunks per rank at least
    assert 0.0 < core.kept_fraction(64) <= 1.0
    assert core.attention_flops_per_token(64) >= 0.0
    assert core.pop_aux_loss() is None


def test_learned_gates_change_what_streaming_supports():
    opts = parse_options("streaming", {"learned_gates": True})
    core = build_attention("streaming", {"learned_gates": True}, CTX)
    assert opts.context_parallel() is None and core.context_parallel_core()[0] is None
    assert "gate" in opts.tensor_parallel_problem() and core.kept_fraction(64) == 1.0


@dataclass(kw_only=True)
class _BigScaleOptions(AttentionOptions):
    """A test-only variant: dense attention with 8x the usual softmax scale."""

    def context_parallel(self) -> str | None:
        return "ring"


class _BigScale(DenseAttention):
    def __init__(self, ctx: AttentionContext, opts: _BigScaleOptions) -> None:
        super().__init__(ctx, DenseOptions(softmax_scale=8.0 / ctx.head_dim ** 0.5))


@pytest.fixture
def big_scale_variant():
    register_attention("test_big_scale", _BigScaleOptions)(_BigScale)
    yield "test_big_scale"
    _REGISTRY.pop("test_big_scale")


def test_a_new_variant_needs_no_edit_elsewhere(big_scale_variant):
    """Config validation and the ring take the variant's own declarations (and its softmax scale)."""
    att = f"model.attention=[{{name: {big_scale_variant}}}]"
    load_config("tiny_lm", ["parallel.sp_degree=2", "parallel.sp_mode=ring", "train.nproc=2", att])
    load_config("tiny_lm", ["parallel.tp_degree=2", "parallel.dp_mode=fsdp2", "train.nproc=2", att])
    with pytest.raises(ConfigError, match="parallel.sp_mode.*nsa"):  # a variant declaring no ring form
        load_config("tiny_lm", ["parallel.sp_degree=2", "parallel.sp_mode=ring", "train.nproc=2",
                                   "model.attention=[{name: nsa}]"])
    from longshard.parallel.ring import apply_ring

    fresh = not dist.is_initialized()
    if fresh:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                          attention=[{"name": big_scale_variant}])
        ref = Transformer(cfg)
        ring = apply_ring(copy.deepcopy(ref), dist.group.WORLD)
        assert all(type(layer.attention.core_attention).__name__ == "RingAttention" for layer in ring.layers)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        # fp32, 1e-5: the same keys through a fused kernel in chunks (observed ~1e-7)
        assert_rel("logits", ref(tokens), ring(tokens), 1e-5)
        plain = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
        plain.load_state_dict(ref.state_dict())
        assert rel_err(plain(tokens), ref(tokens)) > 1e-3, "the variant's scale matters (so the ring used it)"
    finally:
        if fresh:
            dist.destroy_process_group()


def test_s2_dense_schedule_layers_are_dense_layers():
    """An S2 layer made dense by dense_every_n_layers is built as `dense` (its spec resolved when read):
    its module, options and capabilities agree (they used to say ring vs sparse_exchange)."""
    from longshard.models import ModelConfig, Transformer

    s2 = {"name": "s2", "options": {"block": 4, "local_blocks": 1, "vert_stride": 2, "dense_every_n_layers": 2},
          "gate": "headwise"}
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, attention=[s2])
    names = [cfg.layer_attention(i).name for i in range(4)]
    assert names == ["s2", "dense", "s2", "dense"]
    assert cfg.layer_attention(1).gate == "headwise"  # the entry's gate stays
    model = Transformer(cfg)
    for i, layer in enumerate(model.layers):
        spec = cfg.layer_attention(i)
        core = layer.attention.core_attention
        assert type(core).__name__ == ("DenseAttention" if names[i] == "dense" else "S2Attention")
        assert core.context_parallel_core()[0] == parse_options(spec.name, spec.options).context_parallel()
        assert (core.kept_fraction(64) == 1.0) == (names[i] == "dense")
