"""PowerAttention (``power``): the pattern against its definition written with loops, outputs and every
gradient against the fp32 naive reference (odd lengths, GQA layouts, packed documents, bf16), the
receptive field doubling per layer, and the budget it declares."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.errors import ConfigError
from longshard.kernels.attention.naive import attention_naive
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
from longshard.models.attention.power import PowerOptions, power_block_mask

# gather vs naive: the same fp32 softmax over the same kept keys, summed in another order -> ~1e-6.
TOL = 1e-5
# bf16 inputs and bf16 output rounding (8 mantissa bits: 2^-8 ~ 4e-3 per element) against fp32.
TOL_BF16 = 3e-2


def _explicit_mask(S: int, blk: int, H: int, local: int, sink: int, doc: torch.Tensor | None) -> torch.Tensor:
    """(B or 1, H, S, S) token mask from the definition: causal, same document, and the key block at a
    distance < local, a power of two, or among the sink blocks."""
    B = 1 if doc is None else doc.shape[0]
    m = torch.zeros(B, H, S, S, dtype=torch.bool)
    for b in range(B):
        for t in range(S):
            for s in range(t + 1):
                d = t // blk - s // blk
                keep = d < local or (d & (d - 1)) == 0 or s // blk < sink
                same = doc is None or bool(doc[b, t] == doc[b, s])
                m[b, :, t, s] = keep and same
    return m


def _qkv(B, H, kv, S, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, S, D, generator=g).to(dtype).requires_grad_() for h in (H, kv, kv))


@pytest.mark.parametrize("H,kv", [(4, 4), (6, 2), (14, 2)])  # MHA, GQA, Qwen2.5-0.5B's 14 / 2
@pytest.mark.parametrize("S", [13, 37])
@pytest.mark.parametrize("path", ["naive", "gather", "fused"])
@pytest.mark.parametrize("packed", [False, True])
def test_power_matches_definition_with_every_gradient(H, kv, S, path, packed):
    blk, D = 3, 8
    opts = {"block": blk, "local_blocks": 2, "sink_blocks": 1, "path": path}
    core = build_attention("power", opts, AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=kv,
                                                          head_dim=D))
    q, k, v = _qkv(2, H, kv, S, D)
    doc = torch.tensor([[0] * (S // 2) + [1] * (S - S // 2), [0] * S]) if packed else None
    out = core(q, k, v, AttentionBatch(doc_ids_BS=doc))
    mask = _explicit_mask(S, blk, H, 2, 1, doc)
    ref = attention_naive(q, k, v, mask)
    assert_rel(f"power {path} output", ref, out, TOL)
    go = torch.randn_like(ref, generator=torch.Generator().manual_seed(1))
    for name, a, b in zip("qkv", torch.autograd.grad(ref, (q, k, v), go), torch.autograd.grad(out, (q, k, v), go)):
        assert_rel(f"power {path} d{name}", a, b, TOL)


def test_power_bf16_against_the_fp32_reference():
    H, kv, S, D, blk = 6, 2, 37, 16, 4
    core = build_attention("power", {"block": blk, "local_blocks": 1, "path": "gather"},
                           AttentionContext(layer_idx=0, n_layers=1, n_heads=H, n_kv_heads=kv, head_dim=D))
    q, k, v = _qkv(1, H, kv, S, D)
    ref = attention_naive(q, k, v, _explicit_mask(S, blk, H, 1, 0, None))
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = core(qb, kb, vb, AttentionBatch())
    assert out.dtype == torch.bfloat16
    assert_rel("power bf16 output", ref, out.float(), TOL_BF16)
    go = torch.randn_like(ref, generator=torch.Generator().manual_seed(1))
    ref_g = torch.autograd.grad(ref, (q, k, v), go)
    out_g = torch.autograd.grad(out, (qb, kb, vb), go.bfloat16())
    for name, a, b in zip("qkv", ref_g, out_g):
        assert_rel(f"power bf16 d{name}", a, b.float(), TOL_BF16)


def test_receptive_field_doubles_per_layer():
    """With one local block, d layers reach every block less than 2^d blocks back (a distance is a sum of
    distinct powers of two); a distance whose binary form has d + 1 ones needs one more layer."""
    n = 70
    one = power_block_mask(n, PowerOptions(block=16, local_blocks=1)).int()
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    reach = torch.eye(n, dtype=torch.int)
    for d in range(1, 7):
        reach = ((one @ reach) > 0).int()
        assert bool(reach.bool()[(dist >= 0) & (dist < 2 ** d)].all()), d
        assert not bool(reach.bool()[dist == 2 ** (d + 1) - 1].any()), d  # d + 1 ones: not yet
        assert not bool(reach.bool()[dist < 0].any())  # causal


def test_budget_is_a_window_plus_a_logarithm():
    """Each query block reads local + floor(log2 i) blocks; the declared kept fraction follows it."""
    core = build_attention("power", {"block": 16, "local_blocks": 2},
                           AttentionContext(layer_idx=0, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8))
    for n in (64, 128, 1024):
        kept = power_block_mask(n, core.opts).sum(1)
        # distances 0 and 1 are local; then the powers of two 2, 4, ... up to the block's own index
        expect = torch.tensor([1 if i == 0 else 2 + sum(1 for p in range(1, 20) if 2 ** p <= i) for i in range(n)])
        assert torch.equal(kept, expect), n
        assert core.kept_fraction(16 * n) == pytest.approx(float(kept.sum()) / (n * (n + 1) / 2))
    assert core.kept_fraction(16 * 2048) < core.kept_fraction(16 * 1024) < 0.02  # sparser as S grows


def test_power_options_are_checked_by_name():
    for options, message in (({"local_blocks": 0}, "local_blocks"), ({"path": "banded"}, "power has no band"),
                             ({"sink_blocks": -1}, "sink_blocks")):
        with pytest.raises(ConfigError, match=message):
            build_attention("power", options, AttentionContext(layer_idx=0, n_layers=1, n_heads=2, n_kv_heads=2,
                                                               head_dim=8))


@pytest.mark.dist
@pytest.mark.parametrize("dtype", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])  # fp32: -m slow (15 s)
def test_quickstart_trains_with_power_attention_sequence_parallel(dtype, tmp_path, env_cpu):
    """The main job with every layer `power`: 2 ranks, the sparsity-aware exchange moves only the blocks
    the pattern reads (fewer bytes than a dense ring, measured = analytic), the loss goes down."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "longshard.cli", "train", "quickstart",
                           "model.attention=[{name: power, options: {block: 16, local_blocks: 2}}]", "train.steps=6",
                           f"train.dtype={dtype}", "eval.mqar_samples=2", "eval.val_batches=1",
                           "logging.wandb=disabled", "logging.progress=false", f"output_dir={out}"],
                          env=env_cpu, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["losses"][-1] < report["losses"][0]
    t = report["sp_traffic"]
    assert t["sparse_exchange_layers"] == 2
    measured, planned = t["measured_sparse_exchange_bytes_per_step"], t["sparse_exchange_bytes_per_step"]
    assert measured == planned < t["dense_ring_bytes_per_step"]


def test_converted_hf_checkpoint_starts_where_it_was(tmp_path):
    """`init.hf_path` to PowerAttention (no parameters of its own): with local blocks covering the
    sequence the converted model gives transformers' logits; with a short band only the unread keys
    differ (the gap the trainer measures)."""
    import transformers
    from helpers import rel_err, tiny_llama_checkpoint
    from longshard.models.attention import AttentionSpec
    from longshard.models.hf import load_hf_model

    tiny_llama_checkpoint(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 97, (2, 77))
    with torch.no_grad():
        ref = hf(tokens).logits
        cover = load_hf_model(tmp_path / "hf", [AttentionSpec(name="power", options={"block": 8, "local_blocks": 10})])
        assert rel_err(ref, cover.eval()(tokens)) <= 1e-5  # fp32: gathered blocks vs transformers' SDPA (~1e-7)
        band = load_hf_model(tmp_path / "hf", [AttentionSpec(name="power", options={"block": 8, "local_blocks": 1})])
        assert rel_err(ref, band.eval()(tokens)) > 1e-3


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_saved_bytes_per_token_flat_in_s(dtype):
    """The fused path (the CPU default) saves q, k, v, the output and the log-sum-exp: bytes per token
    equal at S and 2S. The gather path keeps its gathered blocks, local + log2(i) per query block: one
    more block at 2S (5 -> 6 of 32 tokens here, x1.2), no S^2 term. The naive path's grow with S, so the
    measure can tell."""
    from longshard.models import ModelConfig, Transformer
    from longshard.train.memory import saved_attention_bytes

    per_token = {}
    for path in ("fused", "gather", "naive"):
        for S in (512, 1024):
            torch.manual_seed(0)
            model = Transformer(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=S,
                                            attention=[{"name": "power", "options": {"block": 32, "local_blocks": 2,
                                                                                     "path": path}}]))
            per_token[path, S] = saved_attention_bytes(model, torch.randint(0, 64, (1, S)), None, dtype) / S
    assert per_token["fused", 1024] <= 1.05 * per_token["fused", 512], per_token
    assert per_token["gather", 1024] <= 1.25 * per_token["gather", 512], per_token
    assert per_token["naive", 1024] > 1.5 * per_token["naive", 512], per_token
    assert per_token["fused", 1024] < per_token["gather", 1024], per_token  # saves q, k, v, o, lse only
