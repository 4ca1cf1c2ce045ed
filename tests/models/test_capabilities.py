"""What a variant supports is declared once, on its options class; the module built from them reads it.

Config validation (before anything is built) and the parallel wrappers therefore ask the same
declaration; every registered variant is covered, a variant defined outside the package (one module,
nothing else edited) is accepted by the ring, and a variant with parameters that claims tensor
parallelism can split it is refused when built.
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
    "streaming_gated": {"block": 4, "sink": 1, "window": 2},
    "dma": {"block": 4, "keep_blocks": 2},
    "moh": {"shared_heads": 1, "top_k": 2},
    "mixed": {"groups": [{"name": "dense", "heads": 2}, {"name": "linear", "heads": 2, "options": {"chunk": 4}}]},
}
CTX = AttentionContext(layer_idx=0, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, model_dim=32)


SHIPPED = sorted(n for n in available_attention() if not n.startswith("test_"))  # tests register their own


@pytest.mark.parametrize("name", SHIPPED)
def test_every_variant_declares_well_formed_capabilities(name):
    """Every registered variant, a new one included without touching this file (its defaults are used
    unless OPTIONS above gives smaller ones): a known ring form, whole zigzag chunks, sane work counts,
    and a module with parameters declares why tensor parallelism cannot split it (else it is not built)."""
    options = OPTIONS.get(name, {})
    opts = parse_options(name, options)
    core = build_attention(name, options, CTX)
    assert core.opts == opts and (core.cp_form is None or core.cp_form in CP_FORMS)
    if any(True for _ in core.parameters()):
        assert opts.tensor_parallel_problem() is not None
    assert opts.ring_seq_multiple(2) % 4 == 0  # two zigzag chunks per rank at least
    assert 0.0 < core.kept_fraction(64) <= 1.0
    assert core.attention_flops_per_token(64) >= 0.0
    assert core.pop_aux_loss() is None


def test_learned_gates_are_their_own_variant():
    """Learned gates used to change what `streaming` supports through a flag; they are `streaming_gated`
    now, with its own declarations, and the old option names the new variant."""
    with pytest.raises(ConfigError, match=r"options\.learned_gates.*use name: streaming_gated"):
        parse_options("streaming", {"learned_gates": True}, "model.attention[0]")
    opts = parse_options("streaming_gated", {})
    core = build_attention("streaming_gated", {"block": 4, "sink": 1, "window": 2}, CTX)
    assert opts.context_parallel() is None and core.cp_form is None
    assert "gate" in core.tensor_parallel_problem() and core.kept_fraction(64) == 1.0
    plain = build_attention("streaming", {"block": 4, "sink": 1, "window": 2}, CTX)
    assert plain.cp_form == "sparse_exchange" and plain.tensor_parallel_problem() is None
    assert plain.kept_fraction(64) < 1.0


@dataclass(kw_only=True)
class _LeakyOptions(AttentionOptions):
    """A test-only variant whose options forget to declare its parameters block tensor parallelism."""


class _Leaky(DenseAttention):
    def __init__(self, ctx: AttentionContext, opts: _LeakyOptions) -> None:
        super().__init__(ctx, DenseOptions())
        self.opts = opts
        self.w = torch.nn.Parameter(torch.ones(ctx.n_heads))


def test_a_variant_with_parameters_must_declare_tensor_parallelism():
    register_attention("test_leaky", _LeakyOptions)(_Leaky)
    try:
        with pytest.raises(TypeError, match=r"'test_leaky': _Leaky has parameters of its own \(w\) but "
                                            r"_LeakyOptions.tensor_parallel_problem\(\) returns None"):
            build_attention("test_leaky", {}, CTX)
    finally:
        _REGISTRY.pop("test_leaky")


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
        assert core.cp_form == parse_options(spec.name, spec.options).context_parallel()
        assert (core.kept_fraction(64) == 1.0) == (names[i] == "dense")
