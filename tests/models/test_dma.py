"""DMA (Dynamic Mask Attention): the naive reference against a per-query loop written from the
definition; the gather path against the naive reference (outputs and the gradients of q, k, v, A and
Delta) for odd lengths, GQA / MQA / Qwen2.5 14-2 layouts and packed documents, fp32 and bf16; the Triton
path (block lists into the block-sparse kernels) the same way under the interpreter, fp16 included; the
guard rails (huge biases stay finite, no gradient through the top-k, gradients exact by gradcheck,
saved bytes per token flat from S to 2S); what it declares (Ulysses only, no tensor parallelism)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel, rel_err, tiny_llama_checkpoint
from longshard.errors import ConfigError
from longshard.kernels.dma import (
    dma_attention_gather,
    dma_attention_naive,
    dma_attention_triton,
    dma_kept_fraction,
    select_key_blocks,
)
from longshard.kernels.dma.naive import dma_token_mask
from longshard.kernels.dma.select import dma_key_bias
from longshard.kernels.triton_support import triton_installed
from longshard.models import ModelConfig, Transformer
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
from longshard.train.config import load_config
from longshard.train.memory import saved_attention_bytes


def _loop_reference(q, k, v, a, delta, block, keep, scale, doc):
    """DMA for one query at a time, as the paper states it (fp64): bias per key from its value, the query
    block's own block plus the keep-1 earlier blocks of highest mean bias, softmax with the bias added.
    Packed: an earlier block is a candidate when its last token is in the document of the query block's
    first or last token."""
    B, H, S, D = q.shape
    K = k.shape[1]
    out = torch.zeros(B, H, S, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            bias = a[kh] * F.softplus(v[b, kh] @ delta[kh])
            n = -(-S // block)
            score = [float(bias[j * block : (j + 1) * block].mean()) for j in range(n)]
            for t in range(S):
                i = t // block
                cand = range(i)
                if doc is not None:
                    q_docs = {int(doc[b, i * block]), int(doc[b, min((i + 1) * block, S) - 1])}
                    cand = [j for j in cand if int(doc[b, min((j + 1) * block, S) - 1]) in q_docs]
                blocks = set(sorted(cand, key=lambda j: (-score[j], j))[: keep - 1]) | {i}
                keys = [j for j in range(t + 1) if j // block in blocks and (doc is None or doc[b, j] == doc[b, t])]
                logits = torch.stack([q[b, h, t] @ k[b, kh, j] * scale + bias[j] for j in keys])
                p = torch.softmax(logits, 0)
                out[b, h, t] = sum(p[n_] * v[b, kh, j] for n_, j in enumerate(keys))
    return out


def _inputs(B, H, K, S, D, dtype=torch.float32, seed=0, a_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g, dtype=dtype)
    k = torch.randn(B, K, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, K, S, D, generator=g, dtype=dtype)
    a = (torch.randn(K, generator=g, dtype=dtype) * a_scale)
    delta = torch.randn(K, D, generator=g, dtype=dtype)
    return q, k, v, a, delta


def _docs(B, S):
    """Two packed documents per row, the second starting at S/3 (row 0) or S/2 (row 1)."""
    return (torch.arange(S)[None] >= torch.tensor([[S // 3], [S // 2]])[:B]).long()


def test_naive_is_the_definition():
    q, k, v, a, delta = _inputs(2, 4, 2, 23, 8, torch.float64)
    doc = _docs(2, 23)
    for d in (None, doc):
        ref = _loop_reference(q, k, v, a, delta, 4, 3, 0.35, d)
        out = dma_attention_naive(q, k, v, a, delta, 4, 3, 0.35, d)
        assert_rel("naive vs loop", ref, out, 1e-12)  # fp64 both: summation order only


LAYOUTS = [(4, 2), (4, 1), (14, 2), (8, 8)]  # GQA, MQA, Qwen2.5's 14/2, MHA


@pytest.mark.parametrize("H,K", LAYOUTS)
@pytest.mark.parametrize("S", [37, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_gather_matches_naive_with_every_gradient(H, K, S, packed):
    """fp32, 1e-5: the same fp32 sums in another order (gathered blocks; observed ~1e-7)."""
    leaves = [t.requires_grad_() for t in _inputs(2, H, K, S, 8)]
    _assert_matches_naive(dma_attention_gather, leaves, 8, 3, 1 / math.sqrt(8), _docs(2, S) if packed else None, 1e-5)


def _assert_matches_naive(fn, leaves, block, keep, scale, doc, tol):
    """``fn`` against the naive reference: the output and the gradients of q, k, v, A and Delta."""
    grads = []
    for f in (dma_attention_naive, fn):
        out = f(*leaves, block, keep, scale, doc)
        (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
        grads.append((out.detach(), [t.grad.clone() for t in leaves]))
        for t in leaves:
            t.grad = None
    (o_ref, g_ref), (o, g) = grads
    assert_rel("out", o_ref, o, tol)
    for name, x, y in zip(("dq", "dk", "dv", "dA", "dDelta"), g_ref, g):
        assert_rel(name, x, y, tol)
    assert g_ref[3].abs().min() > 0 and g_ref[4].abs().max() > 0  # A and Delta train


TRITON = pytest.mark.skipif(not triton_installed(), reason="triton is not installed (pip install triton>=3.0)")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the Triton interpreter (conftest)


@TRITON
@pytest.mark.triton
@pytest.mark.parametrize("H,K", [(4, 2), (14, 2), (4, 1)])
@pytest.mark.parametrize("S,packed", [(37, False), (70, True)])
def test_triton_matches_naive_with_every_gradient(H, K, S, packed):
    """The Triton path (block lists into the block-sparse kernels, bias as a per-key logit term; under the
    interpreter on CPU): fp32 outputs and dq/dk/dv/dA/dDelta within 2e-5 of the naive reference (fp32
    sums in another order; observed ~5e-7). Only the kept (query block, key block) tiles are listed."""
    from longshard.kernels.block_sparse.triton import csr_indices
    from longshard.kernels.dma.triton import dma_block_mask

    leaves = [t.to(DEV).requires_grad_() for t in _inputs(2, H, K, S, 16)]
    doc = _docs(2, S).to(DEV) if packed else None
    _assert_matches_naive(dma_attention_triton, leaves, 16, 2, 0.25, doc, 2e-5)
    idx, ok, _ = select_key_blocks(dma_key_bias(*leaves[2:]), 16, 2, S, S, doc)
    _, _, cnt, _, _ = csr_indices(dma_block_mask(idx, ok, -(-S // 16)), -(-S // 16), K, 16)
    assert int(cnt.sum()) == int(ok.sum())  # the kernel walks exactly the kept blocks


@TRITON
@pytest.mark.triton
def test_triton_fp16_and_huge_bias():
    """fp16 takes the tensor-core branch (fp16 tl.dot, fp32 accumulation) under the interpreter too:
    within 1e-2 of the fp32 reference (11-bit mantissas, P rounded to fp16 before PV). A = 1e4 and 100x
    values: outputs and every gradient finite (bias and dbias stay fp32 in the kernel)."""
    q, k, v, a, delta = (t.to(DEV) for t in _inputs(1, 4, 2, 48, 16))
    ref = dma_attention_naive(q, k, v, a, delta, 16, 2, 0.25)
    out = dma_attention_triton(q.half(), k.half(), v.half(), a, delta, 16, 2, 0.25)
    assert out.dtype == torch.float16
    assert rel_err(ref, out.float()) <= 1e-2
    q, k, v, a, delta = (t.to(DEV) for t in _inputs(1, 4, 2, 40, 16, a_scale=1e4))
    leaves = [q.requires_grad_(), k.requires_grad_(), (v * 100).requires_grad_(), a.requires_grad_(),
              delta.requires_grad_()]
    out = dma_attention_triton(*leaves, 16, 2, 0.3)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@TRITON
@pytest.mark.triton
def test_triton_path_through_the_model_and_its_checks():
    """``path: triton`` runs through the attention module (the same result as ``gather``); a block the
    kernels cannot tile is refused when the options are built, naming the field."""
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16)
    torch.manual_seed(0)
    tri = build_attention("dma", {"block": 16, "keep_blocks": 2, "path": "triton", "a_init": 0.5}, ctx)
    gat = build_attention("dma", {"block": 16, "keep_blocks": 2, "path": "gather", "a_init": 0.5}, ctx)
    gat.load_state_dict(tri.state_dict())
    tri, gat = tri.to(DEV), gat.to(DEV)
    q, k, v, _, _ = (t.to(DEV) for t in _inputs(1, 4, 2, 45, 16))
    batch = AttentionBatch()
    assert_rel("triton vs gather", gat(q, k, v, batch), tri(q, k, v, batch), 2e-5)
    auto = build_attention("dma", {"block": 16}, ctx)
    assert auto.resolve_path(q) == ("triton" if DEV.type == "cuda" else "gather")
    with pytest.raises(ConfigError, match=r"block.*path=triton needs block in"):
        build_attention("dma", {"block": 8, "path": "triton"}, ctx)


def test_bf16_against_the_fp32_reference():
    """bf16 q, k, v: within 2e-2 of the fp32 naive result (bf16 has 8 mantissa bits: ~4e-3 per input)."""
    q, k, v, a, delta = _inputs(1, 4, 2, 50, 16)
    ref = dma_attention_naive(q, k, v, a, delta, 8, 3, 0.25)
    for fn in (dma_attention_naive, dma_attention_gather):
        out = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), a, delta, 8, 3, 0.25)
        assert out.dtype == torch.bfloat16
        assert rel_err(ref, out.float()) <= 2e-2


def test_bias_is_fp32_under_autocast():
    """The selection ranks blocks by the bias: under bf16 autocast (training) it is still computed in fp32
    (1e-6 of the fp32 bias; bf16 would be ~4e-3 off and reorder close blocks)."""
    _, _, v, a, delta = _inputs(2, 4, 2, 96, 16)
    ref = dma_key_bias(v, a, delta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dma_key_bias(v, a, delta)
    assert got.dtype == torch.float32 and rel_err(ref, got) <= 1e-6


def test_huge_bias_stays_finite():
    """The reference's known failure: NaN/Inf in dV and the bias gradient for large A or values."""
    q, k, v, a, delta = _inputs(1, 4, 2, 40, 8, a_scale=1e4)
    v = (v * 100).requires_grad_()
    leaves = [q.requires_grad_(), k.requires_grad_(), v, a.requires_grad_(), delta.requires_grad_()]
    for fn in (dma_attention_naive, dma_attention_gather):
        out = fn(*leaves, 8, 2, 0.3)
        out.square().sum().backward()
        assert torch.isfinite(out).all()
        for t in leaves:
            assert torch.isfinite(t.grad).all()
            t.grad = None


def test_no_gradient_through_the_selection_and_exact_gradients():
    """The top-k is a constant of the step (selection from the detached bias); the gradients of every
    input, A and Delta included, agree with finite differences (fp64 gradcheck)."""
    q, k, v, a, delta = (t.requires_grad_() for t in _inputs(1, 4, 2, 13, 4, torch.float64))
    idx, ok, _ = select_key_blocks(dma_key_bias(v, a, delta), 4, 2, 13, 13)
    assert not idx.requires_grad and not ok.requires_grad
    assert torch.autograd.gradcheck(lambda *t: dma_attention_gather(*t, 4, 2, 0.5), (q, k, v, a, delta))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_saved_bytes_per_token_flat_in_s(dtype):
    """The gather path saves O(S) bytes for backward (no Sq x Sk mask or score); the naive path grows
    with S (so the measurement can tell)."""
    per_token = {}
    for path in ("gather", "naive"):
        for S in (512, 1024):
            torch.manual_seed(0)
            model = Transformer(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=S,
                                            attention=[{"name": "dma", "options": {"block": 32, "keep_blocks": 4,
                                                                                   "path": path}}]))
            tokens = torch.randint(0, 64, (1, S))
            per_token[path, S] = saved_attention_bytes(model, tokens, None, dtype) / S
    assert per_token["gather", 1024] <= 1.05 * per_token["gather", 512], per_token
    assert per_token["naive", 1024] > 1.5 * per_token["naive", 512], per_token


def test_kept_fraction_counts_the_mask():
    S, block, keep = 100, 8, 3
    q, k, v, a, delta = _inputs(1, 2, 2, S, 4)
    idx, ok, q0 = select_key_blocks(dma_key_bias(v, a, delta), block, keep, S, S)
    kept = dma_token_mask(idx, ok, q0, block, S, S, None)[0, 0].sum().item()
    assert kept / (S * (S + 1) / 2) == pytest.approx(dma_kept_fraction(S, block, keep), abs=1e-12)
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4)
    core = build_attention("dma", {"block": block, "keep_blocks": keep}, ctx)
    assert core.kept_fraction(S) == dma_kept_fraction(S, block, keep) < 1.0
    assert core.attention_flops_per_token(S) < build_attention("dense", {}, ctx).attention_flops_per_token(S)


def test_declares_ulysses_only_and_no_tensor_parallelism():
    with pytest.raises(ConfigError, match=r"parallel.sp_mode.*'dma'.*sp_mode=ulysses"):
        load_config("tiny_lm", ["parallel.sp_degree=2", "parallel.sp_mode=ring", "train.nproc=2",
                                "model.attention=[{name: dma}]"])
    with pytest.raises(ConfigError, match=r"parallel.tp_degree.*dma.*A, Delta"):
        load_config("tiny_lm", ["parallel.tp_degree=2", "parallel.dp_mode=fsdp2", "train.nproc=2",
                                "model.attention=[{name: dma}]"])
    load_config("tiny_lm", ["parallel.sp_degree=2", "parallel.sp_mode=ulysses", "train.nproc=2",
                            "model.attention=[{name: dma}]"])
    with pytest.raises(ConfigError, match="keep_blocks"):
        build_attention("dma", {"keep_blocks": 0}, AttentionContext(layer_idx=0, n_layers=1, n_heads=2,
                                                                    n_kv_heads=2, head_dim=4))


@pytest.mark.dist
@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])  # bf16: -m slow (13 s)
def test_quickstart_trains_with_dma_under_ulysses(dtype, tmp_path, env_cpu):
    """The main job with every layer `dma` on its 2 ranks (Ulysses: each rank its heads over the whole
    sequence); the loss goes down and the run reports DMA's kept fraction."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "longshard.cli", "train", "quickstart",
                           "model.attention=[{name: dma, options: {block: 16, keep_blocks: 4}}]",
                           "parallel.sp_mode=ulysses", "train.steps=6", f"train.dtype={dtype}", "eval.mqar_samples=2",
                           "eval.val_batches=1", "logging.wandb=disabled", "logging.progress=false",
                           f"output_dir={out}"], env=env_cpu, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["losses"][-1] < report["losses"][0]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kept = [m["attn_kept_fraction"] for m in metrics if "attn_kept_fraction" in m]
    assert kept and kept[0] == pytest.approx(dma_kept_fraction(256, 16, 4))


def test_converted_hf_checkpoint_starts_where_it_was(tmp_path):
    """`init.hf_path` to DMA: A starts at 0 (no bias), so with a budget that covers every block the
    converted model gives transformers' logits; with a smaller budget only the unread keys differ."""
    import transformers
    from longshard.models.attention import AttentionSpec
    from longshard.models.hf import load_hf_model

    tiny_llama_checkpoint(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 97, (2, 61))
    with torch.no_grad():
        ref = hf(tokens).logits
        whole = load_hf_model(tmp_path / "hf", [AttentionSpec(name="dma", options={"block": 8, "keep_blocks": 8})])
        assert rel_err(ref, whole.eval()(tokens)) <= 1e-5  # fp32: SDPA vs our gathered softmax (~1e-7)
        budget = load_hf_model(tmp_path / "hf", [AttentionSpec(name="dma", options={"block": 8, "keep_blocks": 2})])
        assert rel_err(ref, budget.eval()(tokens)) > 1e-3
