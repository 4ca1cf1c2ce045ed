"""Block-sparse variants: S2, streaming/retrieval heads, sliding window, mixed head groups."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from hypothesis import given, settings
from hypothesis import strategies as st
from longshard.errors import ConfigError
from longshard.kernels.attention.naive import attention_naive
from longshard.kernels.block_sparse import (
    SparsePattern,
    block_sparse_attention_gather,
    block_sparse_attention_naive,
)
from longshard.models import ModelConfig, Transformer
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
from longshard.models.attention.s2 import (
    S2Options,
    check_coverage,
    s2_kept_blocks,
    s2_shard_mode,
    s2_uncovered_residues,
)
from longshard.models.attention.streaming import retrieval_assignment

# gather vs naive: the same fp32 softmax over the same kept keys, summed in another order -> ~1e-6.
TOL = 1e-5


def _ctx(h, kv, d=8, layer=0):
    return AttentionContext(layer_idx=layer, n_layers=2, n_heads=h, n_kv_heads=kv, head_dim=d)


def _qkv(B, H, kv, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, S, D, generator=g).requires_grad_()
    return mk(H), mk(kv), mk(kv)


def _grads(fn, q, k, v, extra=()):
    o = fn(q, k, v)
    go = torch.randn_like(o, generator=torch.Generator().manual_seed(9))
    return (o, *torch.autograd.grad(o, (q, k, v, *extra), go))


VARIANTS = [
    ("s2", {"block": 4, "local_blocks": 2, "vert_stride": 4}, 8, 4),
    ("s2", {"block": 4, "local_blocks": 1, "vert_stride": 2, "sink_blocks": 1}, 4, 2),
    ("streaming", {"block": 4, "sink": 3, "window": 6, "retrieval_heads": [1]}, 4, 2),
    ("sliding_window", {"block": 8, "window": 5}, 4, 1),
    ("mixed", {"groups": [{"name": "dense", "heads": 2}, {"name": "s2", "heads": 6,
                                                           "options": {"block": 4, "local_blocks": 1}}]}, 8, 4),
]


@pytest.mark.parametrize("name,opts,H,kv", VARIANTS, ids=[f"{v[0]}-{i}" for i, v in enumerate(VARIANTS)])
@pytest.mark.parametrize("S", [1, 13, 37])
@pytest.mark.parametrize("packed", [False, True])
def test_fast_paths_match_naive(name, opts, H, kv, S, packed):
    D = 8
    q, k, v = _qkv(2, H, kv, S, D, seed=S)
    starts = torch.rand(2, S, generator=torch.Generator().manual_seed(1)) < 0.1
    doc = torch.cumsum(starts.long(), 1) if packed else None
    batch = AttentionBatch(doc_ids_BS=doc)
    mods = {}
    for path in ("naive", "gather", "banded", "chunked"):
        o = dict(opts)
        if name == "mixed":
            o = {"groups": [dict(g, options=dict(g.get("options", {}), **({"path": path} if g["name"] != "dense"
                                                                              else {"backend": "naive"})))
                            for g in opts["groups"]]}
        else:
            o["path"] = path
        mods[path] = build_attention(name, o, _ctx(H, kv, D))
    ref = _grads(lambda a, b, c: mods["naive"](a, b, c, batch), q, k, v)
    for path in ("gather", "banded", "chunked"):
        out = _grads(lambda a, b, c, m=mods[path]: m(a, b, c, batch), q, k, v)
        for label, r, o in zip(["o", "dq", "dk", "dv"], ref, out):
            assert_rel(f"{name} {path} {label}", r, o, TOL)


@pytest.mark.parametrize("chunk_blocks", [1, 3])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_forms_match_naive(chunk_blocks, fused, packed, monkeypatch):
    """Every chunking of the chunked path, through the fused CPU kernel (band and far calls merged by
    log-sum-exp) and through one SDPA call per chunk, equals the reference; S2 with a far block inside
    the band range of a chunk, streaming with per-group retrieval heads (GQA)."""
    from longshard.kernels.block_sparse import chunked
    from longshard.models.attention import sparse_base

    monkeypatch.setitem(sparse_base.BAND_PATHS, "chunked", lambda *a, **kw: chunked.band_far_attention_chunked(
        *a, chunk_blocks=chunk_blocks, fused=fused, **kw))
    cases = [("s2", {"block": 4, "local_blocks": 3, "vert_stride": 3, "sink_blocks": 1}, 6, 3),
             ("streaming", {"block": 4, "sink": 3, "window": 6, "retrieval_heads": [1]}, 4, 2)]
    for name, opts, H, kv in cases:
        S = 53
        q, k, v = _qkv(2, H, kv, S, 8, seed=chunk_blocks)
        doc = torch.cumsum((torch.rand(2, S, generator=torch.Generator().manual_seed(3)) < 0.08).long(), 1)
        batch = AttentionBatch(doc_ids_BS=doc if packed else None)
        ref_mod, mod = (build_attention(name, dict(opts, path=p), _ctx(H, kv)) for p in ("naive", "chunked"))
        ref = _grads(lambda a, b, c, m=ref_mod, bt=batch: m(a, b, c, bt), q, k, v)
        out = _grads(lambda a, b, c, m=mod, bt=batch: m(a, b, c, bt), q, k, v)
        for label, r, o in zip(["o", "dq", "dk", "dv"], ref, out):
            assert_rel(f"{name} chunk {chunk_blocks} fused={fused} {label}", r, o, TOL)


def _phi3_strided(j: int, head: int, n_query_heads: int, vert_stride: int, offset: int) -> bool:
    """Phi-3-small's get_block_mask rule (vLLM's blocksparse kernels too), written out, plus our global
    offset: head ``head`` keeps older block j when (j + head * max(1, vert_stride // n_heads) + offset + 1)
    % vert_stride == 0, with n_heads the query heads."""
    step = max(1, int(vert_stride / n_query_heads))
    return (j + head * step + offset + 1) % vert_stride == 0


def _dkernel_strided(j: int, head: int, n_query_heads: int, vert_stride: int, offset: int) -> bool:
    """DKernel's get_sparse_attn_mask rule, written out: (j + head * step + head_sliding_offset) %
    vert_stride == 0, step = max(1, int(vert_stride / num_heads)) over the query heads."""
    step = max(1, int(vert_stride / n_query_heads))
    return (j + head * step + offset) % vert_stride == 0


STRIDED = {"phi3": _phi3_strided, "dkernel": _dkernel_strided}


def _explicit_s2_mask(S, blk, H, kv, opts: S2Options, shard: str = "kv"):
    """Token mask written from the definition, with Python loops (independent of the tensor code):
    the shard index is the KV head (kv shards) or the query head (query shards)."""
    m = torch.zeros(H, S, S, dtype=torch.bool)
    for h in range(H):
        shard_index = h // (H // kv) if shard == "kv" else h
        for t in range(S):
            for s in range(t + 1):
                i, j = t // blk, s // blk
                keep = i - j < opts.local_blocks or j < opts.sink_blocks
                keep = keep or (opts.heterogeneous and STRIDED[opts.phase_rule](j, shard_index, H, opts.vert_stride,
                                                                                opts.offset))
                m[h, t, s] = keep
    return m


@pytest.mark.parametrize("H,kv,shard,path", [(4, 4, "kv", "gather"), (4, 2, "kv", "gather"),
                                             (6, 2, "query", "gather"), (6, 2, "query", "chunked"),
                                             (6, 2, "query", "banded"), (14, 2, "query", "flex")])
def test_s2_matches_definition(H, kv, shard, path):
    """Each path against the token mask written from DKernel's rule, for KV-head and query-head shards
    (GQA: the query heads of a group read different far blocks in query mode)."""
    S, blk = 29, 3
    options = {"block": blk, "local_blocks": 2, "vert_stride": 4, "sink_blocks": 1, "offset": 1, "shard": shard,
               "allow_incomplete_coverage": True}
    if path == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
        options["block"] = blk = 16
        S = 16 * 5 + 3
    opts = S2Options(**options)
    q, k, v = _qkv(1, H, kv, S, 8)
    mod = build_attention("s2", {**options, "path": path}, _ctx(H, kv))
    if path == "flex":  # CPU flex_attention has no backward: compare the forward only
        q, k, v = q.detach(), k.detach(), v.detach()
    ref = attention_naive(q, k, v, _explicit_s2_mask(S, blk, H, kv, opts, shard)[None])
    assert_rel(f"s2 {shard} {path} vs definition", ref, mod(q, k, v, AttentionBatch()), TOL)


@pytest.mark.parametrize("rule", ["phi3", "dkernel"])
def test_s2_pattern_follows_its_phase_rule_for_every_layout(rule):
    """The block pattern equals the rule it names (written out above) for every GQA layout
    with up to 16 query heads, strides 1-16 and offsets 0-2, in both shard modes; auto picks kv exactly
    when the KV heads cover the stride."""
    n, checked = 40, 0
    for n_q in range(1, 17):
        for kv in [d for d in range(1, n_q + 1) if n_q % d == 0]:
            for stride in range(1, 17):
                for offset in range(3):
                    for shard in ("kv", "query"):
                        opts = S2Options(block=16, local_blocks=2, vert_stride=stride, offset=offset, shard=shard,
                                         phase_rule=rule)
                        kept = s2_kept_blocks(n, kv, opts, n_q)
                        for h in range(n_q):
                            index = h // (n_q // kv) if shard == "kv" else h
                            row = torch.tensor([STRIDED[rule](j, index, n_q, stride, offset) for j in range(n)])
                            far = kept[h, n - 1, : n - 2]  # the last query block's older blocks
                            assert torch.equal(far, row[: n - 2]), (n_q, kv, stride, offset, shard, h)
                        checked += 1
                    auto = S2Options(block=16, local_blocks=2, vert_stride=stride, offset=offset, phase_rule=rule)
                    covered = not s2_uncovered_residues(kv, S2Options(**{**auto.__dict__, "shard": "kv"}), n_q)
                    assert s2_shard_mode(kv, auto, n_q) == ("kv" if covered else "query")
    assert checked > 3000


def _dkernel_block_mask(num_heads, num_kv_heads, blocks, local_blocks, vert_stride, head_sliding_offset):
    """DKernel's get_sparse_attn_mask block mask as its source computes it: one strided row per KV head,
    repeated for the query heads of its group; step from the query heads."""
    q_pos, k_pos = torch.arange(blocks)[None, :, None], torch.arange(blocks)[None, None]
    step = max(1, int(vert_stride / num_heads))
    rows = [(torch.arange(blocks) + h * step + head_sliding_offset) % vert_stride == 0
            for h in range(num_kv_heads) for _ in range(num_heads // num_kv_heads)]
    strided = torch.vstack(rows).unsqueeze(1)
    return (q_pos >= k_pos) & ((q_pos - k_pos < local_blocks) | strided)


def _phi3_block_mask(num_layout, blocks, local_blocks, vert_stride):
    """Phi-3-small's get_block_mask as its source computes it: one strided row per (query) head."""
    q_pos, k_pos = torch.arange(blocks)[None, :, None], torch.arange(blocks)[None, None]
    step = max(1, int(vert_stride / num_layout))
    strided = torch.vstack([(torch.arange(blocks) + h * step + 1) % vert_stride == 0
                            for h in range(num_layout)]).unsqueeze(1)
    return (q_pos >= k_pos) & ((q_pos - k_pos < local_blocks) | strided)


@pytest.mark.parametrize("H,kv", [(8, 8), (32, 8), (14, 2), (4, 1)])  # MHA, Llama-3, Qwen2.5, MQA
def test_s2_phase_rules_reproduce_dkernel_and_phi3_small_masks(H, kv):
    """A model trained with DKernel (pattern per KV head) or with Phi-3-small's attention (per head) gets
    its own blocks: phase_rule=dkernel with KV shards equals DKernel's mask for any head_sliding_offset,
    phase_rule=phi3 with query shards equals Phi-3-small's, and the two differ (the old docstring named
    one for the other)."""
    n = 37
    for stride in (2, 4, 8, 16):
        for local in (1, 3):
            for off in range(3):
                ours = s2_kept_blocks(n, kv, S2Options(block=16, local_blocks=local, vert_stride=stride, offset=off,
                                                       shard="kv", phase_rule="dkernel",
                                                       allow_incomplete_coverage=True), H)
                assert torch.equal(ours, _dkernel_block_mask(H, kv, n, local, stride, off)), (stride, local, off)
            ours = s2_kept_blocks(n, kv, S2Options(block=16, local_blocks=local, vert_stride=stride, shard="query",
                                                   phase_rule="phi3", allow_incomplete_coverage=True), H)
            assert torch.equal(ours, _phi3_block_mask(H, n, local, stride)), (stride, local)
    base = {"block": 16, "local_blocks": 1, "vert_stride": 4, "shard": "query"}
    dk = s2_kept_blocks(n, kv, S2Options(**base, phase_rule="dkernel"), H)
    p3 = s2_kept_blocks(n, kv, S2Options(**base, phase_rule="phi3"), H)
    assert not torch.equal(dk, p3)
    shifted = S2Options(**base, phase_rule="dkernel", offset=1)
    assert torch.equal(s2_kept_blocks(n, kv, shifted, H), p3)  # phi3 at offset o == dkernel at offset o + 1


def test_streaming_matches_definition():
    H, S, sink, window = 2, 23, 2, 5
    q, k, v = _qkv(1, H, H, S, 8)
    mod = build_attention("streaming", {"block": 4, "sink": sink, "window": window, "retrieval_heads": [0],
                                        "path": "gather"}, _ctx(H, H))
    m = torch.zeros(H, S, S, dtype=torch.bool)
    for t in range(S):
        for s in range(t + 1):
            m[0, t, s] = True
            m[1, t, s] = s < sink or t - s < window
    assert_rel("streaming vs definition", attention_naive(q, k, v, m[None]), mod(q, k, v, AttentionBatch()), TOL)


@settings(max_examples=60, deadline=None)
@given(kv=st.integers(1, 10), stride=st.integers(1, 9), local=st.integers(1, 4), sink=st.integers(0, 2),
       n=st.integers(1, 24), het=st.booleans())
def test_s2_coverage_property(kv, stride, local, sink, n, het):
    opts = S2Options(block=16, local_blocks=local, vert_stride=stride, sink_blocks=sink, heterogeneous=het)
    missing = set(s2_uncovered_residues(kv, opts))
    # a block j is lost iff its residue is missing, it is not a sink, and some query is > local blocks past it
    expect = not any(j % stride in missing for j in range(sink, n - local))
    assert check_coverage(n, kv, opts) == expect
    kept = s2_kept_blocks(n, kv, opts)
    assert not kept.triu(1).any()  # causal: never a future block
    assert kept.diagonal(dim1=1, dim2=2).all()  # every head keeps its own block


def test_s2_rejects_uncovering_heads_and_names_the_field():
    cfg = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=256)
    with pytest.raises(ConfigError, match=r"model.attention\[0\].options.vert_stride.*\[0, 2, 4, 6\]"):
        Transformer(ModelConfig(**cfg, attention=[{"name": "s2", "options": {"vert_stride": 8}}]))
    Transformer(ModelConfig(**cfg, attention=[{"name": "s2", "options": {"vert_stride": 8,
                                                                          "allow_incomplete_coverage": True}}]))
    # dense heads in the same layer cover the context, so the S2 group need not
    Transformer(ModelConfig(**cfg, attention=[{"name": "mixed", "options": {"groups": [
        {"name": "dense", "heads": 1}, {"name": "s2", "heads": 3, "options": {"vert_stride": 8}}]}}]))
    with pytest.raises(ConfigError, match="vert_stride"):
        Transformer(ModelConfig(**cfg, attention=[{"name": "mixed", "options": {"groups": [
            {"name": "sliding_window", "heads": 1}, {"name": "s2", "heads": 3, "options": {"vert_stride": 8}}]}}]))


def test_continue_hf_s2_covers_every_block_on_real_layouts():
    """The shipped continue_hf_s2 options (no coverage escape hatch, every layer S2) build on Qwen2.5-0.5B
    (14 / 2 heads: query shards) and Llama-3-8B (32 / 8: KV shards) and read every block; what query
    shards cost in KV: a KV head's decoding plan lists the union of its query heads' far blocks."""
    import math

    import yaml
    from longshard.train.config import recipe_path

    spec = yaml.safe_load(recipe_path("continue_hf_s2").read_text())["model"]["attention"]
    assert len(spec) == 1 and "allow_incomplete_coverage" not in spec[0]["options"]
    assert "dense_every_n_layers" not in spec[0]["options"]
    kv_share = {}
    for name, (h, kv, dim) in {"qwen2.5-0.5b": (14, 2, 112), "llama-3-8b": (32, 8, 256)}.items():
        model = Transformer(ModelConfig(vocab_size=64, dim=dim, n_layers=2, n_heads=h, n_kv_heads=kv,
                                        max_seq_len=1 << 16, attention=spec))
        core = model.layers[0].attention.core_attention
        assert core.covers_context and type(core).__name__ == "S2Attention"
        assert core.shard == ("query" if name.startswith("qwen") else "kv")
        n = 64  # blocks: 4096 tokens at block 64
        assert check_coverage(n, kv, core.opts, h)
        k_len = n * core.block
        q = torch.zeros(1, h, 1, 8)
        kbar = torch.zeros(1, kv, n, 8)
        blocks = core.decode_plan(q, kbar, k_len).blocks_BKN[0]
        listed = (blocks >= 0).sum(-1).float()  # per KV head
        far = n - core.opts.local_blocks
        kv_share[name] = float((listed.mean() - core.opts.local_blocks) / far)
    # stride 8: KV shards keep 1/8 of the far blocks per KV head; 7 query heads per KV head keep 7/8
    assert math.isclose(kv_share["llama-3-8b"], 1 / 8, abs_tol=0.02)
    assert math.isclose(kv_share["qwen2.5-0.5b"], 7 / 8, abs_tol=0.02)


def test_s2_dense_every_n_layers():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, max_seq_len=256,
                      attention=[{"name": "s2", "options": {"vert_stride": 4, "dense_every_n_layers": 2}}])
    model = Transformer(cfg)
    kinds = [type(m.attention.core_attention).__name__ for m in model.layers]
    assert kinds == ["S2Attention", "DenseAttention", "S2Attention", "DenseAttention"]


def test_mixed_equals_groups_run_separately():
    H, kv, S = 8, 4, 21
    q, k, v = _qkv(1, H, kv, S, 8)
    groups = [{"name": "dense", "heads": 2, "options": {"backend": "naive"}},
              {"name": "sliding_window", "heads": 6, "options": {"window": 4, "block": 4}}]
    mixed = build_attention("mixed", {"groups": groups}, _ctx(H, kv))
    dense = build_attention("dense", {"backend": "naive"}, _ctx(2, 1))
    swa = build_attention("sliding_window", {"window": 4, "block": 4}, _ctx(6, 3))
    b = AttentionBatch()
    ref = torch.cat([dense(q[:, :2], k[:, :1], v[:, :1], b), swa(q[:, 2:], k[:, 1:], v[:, 1:], b)], 1)
    assert_rel("mixed", ref, mixed(q, k, v, b), 1e-6)
    with pytest.raises(ConfigError, match="KV heads"):
        build_attention("mixed", {"groups": [{"name": "dense", "heads": 1}, {"name": "dense", "heads": 7}]},
                        _ctx(H, kv))
    with pytest.raises(ConfigError, match="sum to 6"):
        build_attention("mixed", {"groups": [{"name": "dense", "heads": 6}]}, _ctx(H, kv))


def test_learned_gates_mix_full_and_streaming():
    H, S = 4, 19
    q, k, v = _qkv(1, H, 2, S, 8)
    mod = build_attention("streaming_gated", {"block": 4, "sink": 1, "window": 3}, _ctx(H, 2))
    full = attention_naive(q, k, v, torch.ones(S, S, dtype=torch.bool).tril()[None, None])
    b = AttentionBatch()
    assert_rel("alpha=1 -> full", full, mod(q, k, v, b), TOL)
    with torch.no_grad():
        mod.alpha.zero_()
    stream = build_attention("streaming", {"block": 4, "sink": 1, "window": 3}, _ctx(H, 2))
    assert_rel("alpha=0 -> streaming", stream(q, k, v, b), mod(q, k, v, b), TOL)
    with torch.no_grad():
        mod.alpha.copy_(torch.tensor([0.9, 0.2]))
    out = mod(q, k, v, b)
    (out.square().sum() + mod.last_aux_loss).backward()
    assert mod.alpha.grad is not None and mod.alpha.grad.abs().min() > 0

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      attention=[{"name": "streaming_gated", "options": {"block": 4, "window": 4}}])
    model = Transformer(cfg)
    with torch.no_grad():
        model.layers[1].attention.core_attention.alpha.copy_(torch.tensor([0.3, 0.7]))
    model(torch.randint(0, 64, (1, 9)))
    aux = model.aux_loss()
    assert aux is not None and float(aux.detach()) == pytest.approx(0.05 * (2 + 1.0))
    assert model.aux_loss() is None  # cleared after reading
    assert retrieval_assignment(model) == {0: [0, 1], 1: [1]}


@pytest.mark.parametrize("name,opts", [
    ("s2", {"block": 4, "local_blocks": 1, "vert_stride": 2}),
    ("streaming", {"block": 4, "sink": 2, "window": 4, "retrieval_heads": [0]}),
])
def test_model_paths_agree_and_train(name, opts):
    torch.manual_seed(0)
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    models = {}
    for path in ("naive", "gather"):
        torch.manual_seed(0)
        models[path] = Transformer(ModelConfig(**base, attention=[{"name": name, "options": dict(opts, path=path)}]))
    tokens = torch.randint(0, 64, (2, 31))
    doc = torch.tensor([[0] * 10 + [1] * 21, [0] * 31])
    outs = {p: m(tokens, doc_ids_BS=doc) for p, m in models.items()}
    assert_rel("logits", outs["naive"], outs["gather"], TOL)
    for p in outs:
        outs[p].square().mean().backward()
    for (n, a), b in zip(models["naive"].named_parameters(), models["gather"].parameters()):
        assert_rel(n, a.grad, b.grad, 1e-4)  # through 2 layers; fp32 reorderings compound ~1e-6 -> 1e-5


def test_pattern_kept_fraction():
    pat = SparsePattern(4, s2_kept_blocks(32, 8, S2Options(block=4, local_blocks=4, vert_stride=8)))
    assert 0.0 < pat.kept_fraction() < 0.5
    q, k, v = _qkv(1, 8, 8, 64, 8)
    assert block_sparse_attention_gather(q, k, v, pat).shape == block_sparse_attention_naive(q, k, v, pat).shape


def test_attention_kept_fraction_metric():
    """The logged sparsity: 1 for dense layers, the pattern's kept fraction for block-sparse ones,
    head-weighted for mixed layers (mean over layers)."""
    from longshard.train.trainer import attention_kept_fraction

    base = dict(vocab_size=64, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=512)
    s2 = {"name": "s2", "options": {"block": 16, "local_blocks": 2, "vert_stride": 2}}
    model = Transformer(ModelConfig(**base, n_layers=2, attention=[{"name": "dense"}, s2]))
    core = model.layers[1].attention.core_attention
    expect = core.pattern(512 // 16, torch.device("cpu")).kept_fraction()
    assert 0 < expect < 1
    assert attention_kept_fraction(model, 512) == pytest.approx((1 + expect) / 2)
    mixed = {"name": "mixed", "options": {"groups": [{"name": "dense", "heads": 2}, dict(s2, heads=2)]}}
    model = Transformer(ModelConfig(**base, n_layers=1, attention=[mixed]))
    sub = model.layers[0].attention.core_attention.groups[1].pattern(32, torch.device("cpu")).kept_fraction()
    assert attention_kept_fraction(model, 512) == pytest.approx((2 * 1 + 2 * sub) / 4)
