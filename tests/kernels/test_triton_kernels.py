"""Triton kernels against their naive references: outputs and every gradient.

Without a GPU these run under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set in conftest
before any kernel is defined) on small shapes; with CUDA the same tests run compiled on the GPU
at larger sizes. Run alone with ``pytest -m triton``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from longshard.errors import ConfigError
from longshard.kernels.block_sparse import SparsePattern, block_sparse_attention_naive
from longshard.kernels.block_sparse.pattern import sink_window_pattern
from longshard.kernels.block_sparse.triton import (
    block_sparse_attention_triton,
    block_sparse_attention_triton_mask,
    csr_indices,
)
from longshard.kernels.lightning import lightning_attention_chunk, lightning_attention_naive
from longshard.kernels.lightning.triton import lightning_attention_triton
from longshard.kernels.triton_support import triton_installed
from longshard.models import ModelConfig, Transformer
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
from longshard.models.attention.s2 import S2Options, s2_kept_blocks

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_installed(), reason="triton is not installed (pip install triton>=3.0)"),
]

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
# Interpreter: fp32 everywhere, only the summation order differs from the reference -> ~1e-6.
# CUDA: fp32 tiles use IEEE dot (no TF32), the same bound holds with a margin for reordering.
TOL = 2e-5
# fp16 inputs: q, k, v and the output rounded to 11-bit mantissas (2^-11 ~ 5e-4 each), P cast to fp16
# before the PV product on CUDA; a few roundings compound to ~5e-3 of the largest value.
TOL_FP16 = 1e-2


def _seq(S_cpu: int, S_gpu: int) -> int:
    return S_gpu if CUDA else S_cpu


def _rand(*shape, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype).requires_grad_()


def _packed_docs(B: int, S: int, seed: int) -> torch.Tensor:
    starts = torch.rand(B, S, generator=torch.Generator().manual_seed(seed)) < 0.05
    return torch.cumsum(starts.long(), 1).to(DEV)


def _patterns(S: int, blk: int, H: int, Hkv: int) -> dict[str, SparsePattern]:
    n = -(-S // blk)
    g = torch.Generator().manual_seed(3)
    rand = (torch.rand(H, n, n, generator=g) < 0.4) | torch.eye(n, dtype=torch.bool)
    s2 = s2_kept_blocks(n, Hkv, S2Options(block=blk, local_blocks=2, vert_stride=Hkv, sink_blocks=1))
    stream = torch.tensor([i % 2 == 0 for i in range(H)])
    return {
        "dense": SparsePattern(blk, torch.ones(H, n, n, dtype=torch.bool)),
        "random": SparsePattern(blk, rand),
        "s2": SparsePattern(blk, s2.repeat_interleave(H // Hkv, dim=0)),
        "sink_window": sink_window_pattern(n, blk, H, stream, sink=5, window=blk + 3),
        # equal block lists (heads stacked in one program) but a different token window per head
        "stacked_windows": SparsePattern(blk, torch.ones(H, n, n, dtype=torch.bool),
                                         torch.tensor([0, blk + 3, 7, 0] * H)[:H], torch.tensor([0, 2, 1, 0] * H)[:H]),
    }


def _check_grads(name, ref_fn, fn, inputs, tol, extra_out=False):
    out_ref = ref_fn(*inputs)
    out = fn(*inputs)
    outs_ref = out_ref if extra_out else (out_ref,)
    outs = out if extra_out else (out,)
    seeds = torch.Generator().manual_seed(11)
    cot = [torch.randn(o.shape, generator=seeds).to(DEV) for o in outs_ref]
    loss_ref = sum((o.float() * c).sum() for o, c in zip(outs_ref, cot))
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cot))
    g_ref = torch.autograd.grad(loss_ref, inputs)
    g = torch.autograd.grad(loss, inputs)
    for i, (a, b) in enumerate(zip(outs_ref, outs)):
        assert_rel(f"{name} out{i}", a.float(), b.float(), tol)
    for i, (a, b) in enumerate(zip(g_ref, g)):
        assert_rel(f"{name} grad{i}", a.float(), b.float(), tol)


@pytest.mark.parametrize("mask", ["dense", "random", "s2", "sink_window", "stacked_windows"])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("packed", [False, True])
def test_block_sparse_matches_naive(mask, H, Hkv, packed):
    S, blk, D = _seq(77, 1000), 16, 24  # odd length, head dim not a power of two
    pat = _patterns(S, blk, H, Hkv)[mask].to(DEV)
    q, k, v = _rand(2, H, S, D, seed=1), _rand(2, Hkv, S, D, seed=2), _rand(2, Hkv, S, D, seed=3)
    doc = _packed_docs(2, S, seed=4) if packed else None
    _check_grads(f"{mask} H{H}/{Hkv}", lambda a, b, c: block_sparse_attention_naive(a, b, c, pat, doc),
                 lambda a, b, c: block_sparse_attention_triton(a, b, c, pat, doc), (q, k, v), TOL)


def test_block_sparse_lse_and_its_gradient():
    """The returned log-sum-exp is the reference's, and a loss through it differentiates correctly."""
    S, blk, H, Hkv, D = 45, 16, 4, 2, 16
    pat = _patterns(S, blk, H, Hkv)["random"].to(DEV)
    q, k, v = _rand(1, H, S, D, seed=5), _rand(1, Hkv, S, D, seed=6), _rand(1, Hkv, S, D, seed=7)
    from longshard.kernels.attention.naive import attention_naive
    from longshard.kernels.block_sparse.pattern import dense_mask

    def ref(a, b, c):
        return attention_naive(a, b, c, dense_mask(pat, S, S, None, DEV), return_lse=True)

    _check_grads("lse", ref, lambda a, b, c: block_sparse_attention_triton(a, b, c, pat, return_lse=True),
                 (q, k, v), TOL, extra_out=True)


def test_block_sparse_per_batch_masks():
    """A (B, H, nQ, nK) mask (dynamic / selection-based sparsity) equals each element run with its own."""
    S, blk, H, D = 50, 16, 2, 16
    n = -(-S // blk)
    masks = (torch.rand(2, H, n, n, generator=torch.Generator().manual_seed(8)) < 0.5) | torch.eye(n, dtype=bool)
    q, k, v = _rand(2, H, S, D, seed=9), _rand(2, H, S, D, seed=10), _rand(2, H, S, D, seed=11)
    o, _ = block_sparse_attention_triton_mask(q, k, v, masks.to(DEV), blk)
    for b in range(2):
        ref = block_sparse_attention_naive(q[b : b + 1], k[b : b + 1], v[b : b + 1], SparsePattern(blk, masks[b]))
        assert_rel(f"batch {b}", ref, o[b : b + 1], TOL)


def test_block_sparse_csr_skips_upper_and_dropped_blocks():
    mask = torch.tensor([[[1, 1, 1], [0, 1, 1], [1, 0, 1]]], dtype=torch.bool)[None]  # (1, 1, 3, 3)
    share, idx, cnt, idx_t, cnt_t = csr_indices(mask, 3, 1, 16)
    assert share == 1
    assert cnt.tolist() == [[[1, 1, 2]]]  # upper blocks dropped by causality
    assert idx[0, 0, 2, :2].tolist() == [0, 2]
    assert cnt_t.tolist() == [[[2, 1, 1]]]  # key block 0 read by query blocks 0 and 2


def test_gqa_heads_with_equal_lists_share_a_program():
    """Heads of a GQA group with the same block lists are stacked (K/V loaded once), up to MAX_ROWS rows."""
    n, H, kv = 4, 8, 2
    same = torch.ones(H, n, n, dtype=torch.bool)[None]
    assert csr_indices(same, n, kv, 16)[0] == 4  # group of 4, 4 x 16 rows <= 128
    assert csr_indices(same, n, kv, 64)[0] == 2  # 2 x 64 rows
    assert csr_indices(same, n, kv, 128)[0] == 1
    differ = same.clone()
    differ[0, 2:4, 3, 0] = False  # heads 2, 3 drop a block that heads 0, 1 keep: pairs still match
    assert csr_indices(differ, n, kv, 16)[0] == 2
    differ[0, 3, 3, 1] = False  # now heads 2 and 3 differ too
    assert csr_indices(differ, n, kv, 16)[0] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_half_precision(dtype):
    """fp16/bf16 inputs; under the interpreter tiles are upcast to fp32 after loading (its bf16 dot is wrong)."""
    S, blk, H, Hkv, D = _seq(40, 2048), 16, 4, 2, 32
    pat = _patterns(S, blk, H, Hkv)["s2"].to(DEV)
    q, k, v = (_rand(1, h, S, D, seed=s, dtype=dtype) for h, s in ((H, 12), (Hkv, 13), (Hkv, 14)))
    tol = TOL_FP16 if dtype == torch.float16 else 4 * TOL_FP16  # bf16: 8-bit mantissa, 8x coarser than fp16
    _check_grads(f"{dtype}", lambda a, b, c: block_sparse_attention_naive(a.float(), b.float(), c.float(), pat),
                 lambda a, b, c: block_sparse_attention_triton(a, b, c, pat), (q, k, v), tol)


@pytest.mark.parametrize("S", [1, 33, 77])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_lightning_matches_chunk_and_naive(S, packed, with_state):
    S = _seq(S, S * 37)
    B, H, D, E, chunk = 2, 3, 20, 80, 16  # E > 64: two value-dim blocks, partial dQ/dK summed
    log_decay = torch.tensor([0.3, 0.05, 0.0], device=DEV)
    q, k, v = _rand(B, H, S, D, seed=1), _rand(B, H, S, D, seed=2), _rand(B, H, S, E, seed=3)
    doc = _packed_docs(B, S, seed=4) if packed else None
    inputs = (q, k, v)
    if with_state:
        inputs = (*inputs, _rand(B, H, D, E, seed=5))

    def run(fn):
        return lambda *x: fn(*x[:3], log_decay, doc, chunk, x[3] if with_state else None)

    # reference: the PyTorch blocked form (itself tested against the quadratic naive form)
    _check_grads("lightning", run(lightning_attention_chunk), run(lightning_attention_triton), inputs, TOL,
                 extra_out=True)
    if not with_state:
        o, _ = lightning_attention_triton(q, k, v, log_decay, doc, chunk)
        assert_rel("lightning vs naive", lightning_attention_naive(q, k, v, log_decay, doc), o, TOL)


@pytest.mark.parametrize("chunk", [16, 64])
def test_lightning_tensor_core_branch_fp16(chunk):
    """fp16 inputs take the non-IEEE branch (as bf16 does on CUDA) under the interpreter too; a requested
    chunk above the launch table's runs as several kernel chunks. Against the fp32 blocked form."""
    S, B, H, D, E = _seq(45, 2000), 1, 2, 16, 48
    log_decay = torch.tensor([0.2, 0.01], device=DEV)
    q, k, v = (_rand(B, H, S, d, seed=s, dtype=torch.float16) for d, s in ((D, 31), (D, 32), (E, 33)))
    doc = _packed_docs(B, S, seed=34)
    _check_grads("lightning fp16",
                 lambda a, b, c: lightning_attention_chunk(a.float(), b.float(), c.float(), log_decay, doc, 16)[0],
                 lambda a, b, c: lightning_attention_triton(a, b, c, log_decay, doc, chunk)[0], (q, k, v), TOL_FP16)


def test_lightning_state_passing_equals_one_pass():
    """Two halves with the first half's final state passed on equal one pass (sequence-parallel contract)."""
    B, H, S, D, chunk = 1, 2, 64, 16, 16
    a = torch.tensor([0.1, 0.02], device=DEV)
    q, k, v = _rand(B, H, S, D, seed=1), _rand(B, H, S, D, seed=2), _rand(B, H, S, D, seed=3)
    o_full, s_full = lightning_attention_triton(q, k, v, a, None, chunk)
    h = 40  # not a chunk multiple
    o1, s1 = lightning_attention_triton(q[:, :, :h], k[:, :, :h], v[:, :, :h], a, None, chunk)
    o2, s2 = lightning_attention_triton(q[:, :, h:], k[:, :, h:], v[:, :, h:], a, None, chunk, s1)
    assert_rel("outputs", o_full, torch.cat([o1, o2], 2), TOL)
    assert_rel("final state", s_full, s2, TOL)


def _ctx(h, kv, d):
    return AttentionContext(layer_idx=0, n_layers=2, n_heads=h, n_kv_heads=kv, head_dim=d)


@pytest.mark.parametrize("name,opts", [
    ("s2", {"block": 16, "local_blocks": 1, "vert_stride": 2}),
    ("streaming", {"block": 16, "sink": 4, "window": 20, "retrieval_heads": [0]}),
    ("sliding_window", {"block": 16, "window": 21}),
])
def test_registry_variants_run_the_kernel(name, opts):
    H, kv, S, D = 4, 2, 53, 16
    q, k, v = _rand(1, H, S, D, seed=1), _rand(1, kv, S, D, seed=2), _rand(1, kv, S, D, seed=3)
    batch = AttentionBatch(doc_ids_BS=_packed_docs(1, S, seed=4))
    ref = build_attention(name, dict(opts, path="naive"), _ctx(H, kv, D))
    tri = build_attention(name, dict(opts, path="triton"), _ctx(H, kv, D))
    _check_grads(name, lambda a, b, c: ref(a, b, c, batch), lambda a, b, c: tri(a, b, c, batch), (q, k, v), TOL)


def test_linear_model_triton_path_matches_chunk():
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=128)
    models = {}
    for path in ("chunk", "triton"):
        torch.manual_seed(0)
        spec = [{"name": "linear", "options": {"path": path, "chunk": 16}}]
        models[path] = Transformer(ModelConfig(**base, attention=spec)).to(DEV)
    tokens = torch.randint(0, 64, (2, 37), device=DEV)
    doc = torch.tensor([[0] * 15 + [1] * 22, [0] * 37], device=DEV)
    outs = {p: m(tokens, doc_ids_BS=doc) for p, m in models.items()}
    assert_rel("logits", outs["chunk"], outs["triton"], TOL)
    for p in outs:
        outs[p].square().mean().backward()
    for (n, a), b in zip(models["chunk"].named_parameters(), models["triton"].parameters()):
        assert_rel(n, a.grad, b.grad, 1e-4)  # through 2 layers and RMS norms: reorderings compound to ~1e-5


def test_triton_path_rejects_bad_tile_sizes():
    with pytest.raises(ConfigError, match="block"):
        build_attention("s2", {"block": 24, "path": "triton"}, _ctx(4, 2, 16))
    with pytest.raises(ConfigError, match="chunk"):
        build_attention("linear", {"chunk": 48, "path": "triton"}, _ctx(4, 2, 16))


def test_kernels_benchmark_smoke_writes_records(tmp_path):
    """benchmarks/kernels.py runs (tiny shapes, interpreter on CPU) and writes the documented record keys."""
    import json
    import os
    import subprocess
    import sys

    from helpers import REPO

    out = tmp_path / "k.json"
    env = dict(os.environ, TRITON_INTERPRET="0" if CUDA else "1")
    args = [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--json", str(out)]
    args += ["--lengths", "8192"] if CUDA else ["--smoke", "--lengths", "64"]
    subprocess.run(args, check=True, env=env, capture_output=True, timeout=600)
    records = json.loads(out.read_text())
    keys = {"kernel", "mask", "seq_len", "dtype", "device", "fwd_ms", "fwd_bwd_ms", "baseline",
            "baseline_fwd_bwd_ms", "flop_ratio"}
    assert {(r["kernel"], r["mask"]) for r in records} >= {("block_sparse", "s2"), ("lightning", "causal_decay")}
    assert any(r["kernel"] == "dma" and "gather_fwd_bwd_ms" in r for r in records)
    for r in records:
        assert keys <= r.keys() and r["fwd_bwd_ms"] > 0 and r["flop_ratio"] >= 1.0


@pytest.mark.parametrize("packed", [False, True])
def test_nsa_selected_branch_through_the_kernel(packed):
    """NSA's per-token selected blocks (shared by a GQA group) through the block-sparse kernel equal
    the gathered PyTorch branch: outputs and dq/dk/dv."""
    from longshard.kernels.nsa.gather import _selected_gather, _selected_triton
    from longshard.kernels.nsa.select import NSAGeometry, select_blocks

    B, H, Hkv, S, D = 2, 4, 2, _seq(70, 700), 16
    geo = NSAGeometry(8, 8, 16, 3, 1, 16)  # compress block/stride 8, select block 16, top-3, 1 local, window 16
    g = torch.Generator().manual_seed(5)
    n_cmp = S // 8
    p_cmp = torch.softmax(torch.randn(B, H, S, n_cmp, generator=g), -1).to(DEV)  # stand-in compressed scores
    idx, ok = select_blocks(geo, p_cmp, Hkv, S, S)
    q, k, v = _rand(B, H, S, D, seed=6), _rand(B, Hkv, S, D, seed=7), _rand(B, Hkv, S, D, seed=8)
    doc = _packed_docs(B, S, seed=9) if packed else None
    scale = D**-0.5
    _check_grads("nsa selected", lambda a, b, c: _selected_gather(a, b, c, idx, ok, geo, scale, doc),
                 lambda a, b, c: _selected_triton(a, b, c, idx, ok, geo, scale, doc), (q, k, v), TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["ieee", "tensor_core"])
@pytest.mark.parametrize("sub", [(16, 16), (16, 32), (32, 16)], ids=lambda s: f"n{s[0]}m{s[1]}")
@pytest.mark.parametrize("mask", ["s2", "sink_window", "stacked_windows"])
def test_block_sparse_sub_tiles(mask, sub, dtype, monkeypatch):
    """A 32-token block walked in key / query sub-tiles (the launch table's split of big blocks) gives
    the naive outputs and gradients: GQA stacking, per-head windows, packed documents, odd length.
    fp16 runs the tensor-core branch (``tl.dot`` in fp16, fp32 accumulation) under the interpreter."""
    import longshard.kernels.block_sparse.triton as bst

    block_n, block_m = sub
    branch = "fp32" if dtype == torch.float32 else "tc"
    for kernel in ("fwd", "dq", "dkdv"):
        monkeypatch.setitem(bst.LAUNCH, (kernel, branch), {64: (block_m, block_n, 4, 1)})
    S, blk, H, Hkv, D = _seq(75, 1000), 32, 4, 2, 24
    pat = _patterns(S, blk, H, Hkv)[mask].to(DEV)
    q, k, v = (_rand(2, h, S, D, seed=s, dtype=dtype) for h, s in ((H, 21), (Hkv, 22), (Hkv, 23)))
    doc = _packed_docs(2, S, seed=24)
    tol = TOL if dtype == torch.float32 else TOL_FP16
    _check_grads(f"{mask} {sub}", lambda a, b, c: block_sparse_attention_naive(a.float(), b.float(), c.float(),
                                                                               pat, doc),
                 lambda a, b, c: block_sparse_attention_triton(a, b, c, pat, doc), (q, k, v), tol)
