"""MoH (Mixture-of-Head attention): the gates as defined (exactly 1 per active head at zero routers,
top-k renormalised, balance top_k when the router is uniform) and against the reference code's
formulas as written (SkyworkAI/MoH: gates, lone groups, load-balance loss); the routed path, which
computes only the (token, head) pairs used, and the all-heads flash path, against the naive reference
(every head computed, then gated) in outputs
and every gradient (q, k, v and the three routers) for MHA, GQA, MQA and Qwen2.5's 14/2 heads, odd
lengths, packed documents, fp32 and bf16; the router in bf16; what it declares; an HF conversion."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from helpers import assert_rel, rel_err, tiny_llama_checkpoint
from longshard.errors import ConfigError
from longshard.kernels.moh import moh_attention_all_heads, moh_attention_naive, moh_attention_routed, moh_gates
from longshard.models.attention import AttentionContext, build_attention
from longshard.train.config import load_config


def _routers(Hs, Hr, E, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(Hs, E, generator=g) * std, torch.randn(Hr, E, generator=g) * std,
            torch.randn(2, E, generator=g) * std)


def test_gates_follow_the_definition():
    x = torch.randn(2, 9, 16)
    ws, wr, w0 = _routers(2, 4, 16)
    g = moh_gates(x, ws, wr, w0, 2)
    alpha = 2 * torch.softmax(x @ w0.t(), -1)
    assert_rel("shared", alpha[..., :1] * 2 * torch.softmax(x @ ws.t(), -1), g.g_BSH[..., :2], 1e-6)
    logits = x @ wr.t()
    assert (g.chosen_BSR.sum(-1) == 2).all()
    top = logits.topk(2, -1).indices
    assert torch.equal(torch.zeros_like(g.chosen_BSR).scatter(-1, top, True), g.chosen_BSR)
    ren = torch.softmax(logits.masked_fill(~g.chosen_BSR, float("-inf")), -1)
    assert_rel("routed", alpha[..., 1:] * 2 * ren, g.g_BSH[..., 2:], 1e-6)
    zero = moh_gates(x, ws * 0, wr * 0, w0 * 0, 2)  # zero routers: every active head weighs exactly 1
    assert torch.equal(zero.g_BSH[..., :2], torch.ones(2, 9, 2))
    assert torch.equal(zero.g_BSH[..., 2:], zero.chosen_BSR.float())
    assert float(zero.balance) == pytest.approx(2.0)  # uniform router probabilities: top_k, as the reference


def _reference_gates(x, ws, wr, w0, k):
    """The gates and load-balance loss of SkyworkAI/MoH (MoH-ViT/attention.py, ``Attention.forward``), the
    formulas as that code writes them: softmax over the routed heads, top-k mask, renormalised (eps clamp)
    times k; ``mean(me * ce) * E * E``; shared heads ``softmax * Hs`` (ones for a single one); the group
    weights ``2 softmax(wg_0 x)`` only when both groups exist."""
    E = x.shape[-1]
    xf = x.reshape(-1, E)
    Hs, Hr = ws.shape[0], wr.shape[0]
    routed = l_aux = None
    if Hr:
        probs = torch.softmax(xf @ wr.t(), dim=1)
        mask = torch.nn.functional.one_hot(probs.topk(k, dim=1).indices, Hr).sum(1)
        l_aux = torch.mean(probs.mean(0) * mask.float().mean(0)) * Hr * Hr
        routed = probs * mask
        routed = routed / routed.sum(1, keepdim=True).clamp(min=torch.finfo(routed.dtype).eps) * k
    shared = torch.softmax(xf @ ws.t(), dim=1) * Hs if Hs > 1 else torch.ones(xf.shape[0], Hs) * Hs
    if Hr and Hs:
        w = torch.softmax(xf @ w0.t(), dim=1) * 2
        gates = torch.cat([w[:, :1] * shared, w[:, 1:] * routed], dim=1)
    else:
        gates = routed if Hr else shared
    return gates.view(*x.shape[:-1], -1), l_aux


@pytest.mark.parametrize("Hs,Hr,k", [(2, 4, 2), (1, 5, 3), (0, 6, 2), (4, 0, 0), (3, 11, 4)])
def test_gates_and_balance_loss_match_the_reference_code(Hs, Hr, k):
    """fp32, 1e-6: the same formulas in a different order (float rounding only). Lone groups (no shared or
    no routed heads) carry no group weight; the balance loss is the reference's (top_k when balanced)."""
    x = torch.randn(3, 17, 16, generator=torch.Generator().manual_seed(2))
    ws, wr, w0 = _routers(Hs, Hr, 16)
    ref_g, ref_aux = _reference_gates(x, ws, wr, w0, k)
    got = moh_gates(x, ws, wr, w0 if Hs and Hr else None, k)
    assert_rel("gates", ref_g, got.g_BSH, 1e-6)
    if Hr:
        assert_rel("balance", ref_aux, got.balance, 1e-6)
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=Hs + Hr, n_kv_heads=1, head_dim=8, model_dim=16)
    layer = build_attention("moh", {"shared_heads": Hs, "top_k": k}, ctx)
    assert (layer.w_mix is None) == (not (Hs and Hr))  # no unused parameter for a lone group


LAYOUTS = [(4, 2, 1, 2), (4, 1, 2, 1), (14, 2, 4, 3), (8, 8, 2, 3), (6, 2, 4, 1)]  # H, K, shared, top_k
# (the shared heads of (6, 2, 4, 1) span one and a third KV groups: their KV heads are copied per head)


@pytest.mark.parametrize("H,K,Hs,k", LAYOUTS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("q_chunk", [256, 5])
def test_routed_matches_naive_with_every_gradient(H, K, Hs, k, packed, q_chunk):
    """fp32, 1e-5: the same attention for the computed pairs, SDPA vs the explicit softmax (~1e-7).
    ``q_chunk`` 5: several chunks of gathered queries per head, each reading keys up to its last query."""
    B, S, D, E = 2, 37, 8, 16
    g = torch.Generator().manual_seed(1)
    q, kk, v = (torch.randn(B, h, S, D, generator=g).requires_grad_() for h in (H, K, K))
    x = torch.randn(B, S, E, generator=g)
    routers = [w.requires_grad_() for w in _routers(Hs, H - Hs, E)]
    doc = (torch.arange(S)[None] >= torch.tensor([[S // 3], [S // 2]])).long() if packed else None
    results = []
    for fn in (moh_attention_naive, partial(moh_attention_routed, q_chunk=q_chunk), moh_attention_all_heads):
        gates = moh_gates(x, *routers, k)
        out = fn(q, kk, v, gates, 1 / math.sqrt(D), doc)
        ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + gates.balance).backward()
        leaves = [q, kk, v, *routers]
        results.append((out.detach(), [t.grad.clone() for t in leaves]))
        for t in leaves:
            t.grad = None
    (o_ref, g_ref), (o, g_out), (o_all, g_all) = results
    for path, (po, pg) in {"routed": (o, g_out), "all_heads": (o_all, g_all)}.items():
        assert_rel(f"{path} out", o_ref, po, 1e-5)
        for name, a, b in zip(("dq", "dk", "dv", "dW_shared", "dW_routed", "dW0"), g_ref, pg):
            assert_rel(f"{path} {name}", a, b, 1e-5)
    assert g_ref[4].abs().max() > 0 and g_ref[5].abs().max() > 0  # the routers and mixing weights train
    chosen = moh_gates(x, *routers, k).chosen_BSR
    unchosen = ~chosen.transpose(1, 2)  # (B, Hr, S): those rows are exactly 0
    assert (o[:, Hs:][unchosen] == 0).all()


def test_bf16_inputs_and_router():
    """bf16 q, k, v within 2e-2 of the fp32 reference (bf16 inputs: ~4e-3 each); the router runs in fp32
    from a bf16 layer input (finite, the same choice as fp32 on the rounded input)."""
    B, H, K, S, D, E = 1, 4, 2, 40, 16, 32
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, S, D, generator=g) for h in (H, K, K))
    x = torch.randn(B, S, E, generator=g)
    routers = _routers(1, 3, E)
    ref = moh_attention_naive(q, k, v, moh_gates(x, *routers, 2), 0.25)
    gb = moh_gates(x.bfloat16(), *(w.bfloat16() for w in routers), 2)
    assert gb.g_BSH.dtype == torch.float32 and torch.isfinite(gb.g_BSH).all() and torch.isfinite(gb.balance)
    g32 = moh_gates(x.bfloat16().float(), *(w.bfloat16().float() for w in routers), 2)
    assert torch.equal(gb.chosen_BSR, g32.chosen_BSR)
    out = moh_attention_routed(q.bfloat16(), k.bfloat16(), v.bfloat16(), moh_gates(x, *routers, 2), 0.25)
    assert out.dtype == torch.bfloat16 and rel_err(ref, out.float()) <= 2e-2


def test_router_is_fp32_under_autocast():
    """Training runs under bf16 autocast: the routers must not follow it (bf16 logits flip close top-k
    choices). Under autocast the gates equal the fp32 gates of the same inputs (1e-6: fp32 roundings)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 32, generator=g)
    routers = _routers(2, 6, 32, std=0.5)
    ref = moh_gates(x, *routers, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moh_gates(x, *routers, 3)
    assert got.g_BSH.dtype == torch.float32 and torch.equal(got.chosen_BSR, ref.chosen_BSR)
    assert rel_err(ref.g_BSH, got.g_BSH) <= 1e-6 and rel_err(ref.balance, got.balance) <= 1e-6


def test_work_counts_the_active_heads():
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=16, model_dim=64)
    dense = build_attention("dense", {}, ctx).attention_flops_per_token(1024)
    for shared, k in ((2, 6), (2, 2), (1, 1)):
        core = build_attention("moh", {"shared_heads": shared, "top_k": k}, ctx)
        assert core.kept_fraction(1024) == (shared + k) / 8
        attn = core.attention_flops_per_token(1024) - 2 * 64 * 10  # less the routers
        assert attn == pytest.approx(dense * (shared + k) / 8)


def test_declares_ulysses_only_no_tensor_parallelism_and_checks_its_heads():
    """Ulysses is accepted (gates exchanged per head: tests/dist/ulysses_check.py); a ring (alone or in
    hybrid) would spread a head's queries over ranks and is refused naming sp_mode=ulysses."""
    for mode in ("ring", "hybrid"):
        with pytest.raises(ConfigError, match=r"parallel.sp_mode.*moh.*use sp_mode=ulysses"):
            load_config("tiny_lm", ["parallel.sp_degree=4", f"parallel.sp_mode={mode}", "train.nproc=4",
                                    "parallel.sp_ulysses_degree=2", "model.attention=[{name: moh}]"])
    load_config("tiny_lm", ["parallel.sp_degree=2", "parallel.sp_mode=ulysses", "train.nproc=2",
                            "model.attention=[{name: moh}]"])
    with pytest.raises(ConfigError, match=r"parallel.tp_degree.*moh.*router"):
        load_config("tiny_lm", ["parallel.tp_degree=2", "parallel.dp_mode=fsdp2", "train.nproc=2",
                                "model.attention=[{name: moh}]"])
    ctx = AttentionContext(layer_idx=3, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, model_dim=32)
    with pytest.raises(ConfigError, match=r"model.attention\[3\].options.top_k.*top_k=3 of 2 routed"):
        build_attention("moh", {"shared_heads": 2, "top_k": 3}, ctx)
    with pytest.raises(ConfigError, match=r"shared_heads.*5 shared heads"):
        build_attention("moh", {"shared_heads": 5, "top_k": 0}, ctx)


def test_converted_hf_checkpoint_starts_where_the_maths_allows(tmp_path):
    """Zero routers (`router_std: 0`): with every head shared the converted model gives transformers'
    logits; with 1 shared + top-1 of 3 routed it differs only by the heads not chosen."""
    import transformers
    from longshard.models.attention import AttentionSpec
    from longshard.models.hf import load_hf_model

    tiny_llama_checkpoint(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        ref = hf(tokens).logits
        every = load_hf_model(tmp_path / "hf", [AttentionSpec(name="moh", options={"shared_heads": 4, "top_k": 0,
                                                                                      "router_std": 0.0})])
        assert rel_err(ref, every.eval()(tokens)) <= 1e-5  # fp32: SDPA with a mask vs transformers' SDPA
        part = load_hf_model(tmp_path / "hf", [AttentionSpec(name="moh", options={"shared_heads": 1, "top_k": 1,
                                                                                     "router_std": 0.0})])
        assert rel_err(ref, part.eval()(tokens)) > 1e-3


@pytest.mark.dist
@pytest.mark.parametrize("dtype,sp", [("fp32", "ulysses"), ("bf16", "dp")])
def test_quickstart_trains_with_moh(dtype, sp, tmp_path, env_cpu):
    """The main job with every layer `moh` (1 shared + top-1 of 3 routed heads: half the heads per
    token) on its 2 ranks, under Ulysses (each rank 2 of the 4 heads over the whole sequence) or data
    parallel; the loss goes down, the balance loss (the ranks' mean) is in the objective and the kept
    fraction is the active share."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "longshard.cli", "train", "quickstart",
                           "model.attention=[{name: moh, options: {shared_heads: 1, top_k: 1}}]",
                           *(["parallel.sp_degree=1", "train.micro_batch_size=8"] if sp == "dp" else
                             ["parallel.sp_mode=ulysses"]), "train.steps=6",
                           f"train.dtype={dtype}", "eval.mqar_samples=2", "eval.val_batches=1",
                           "logging.wandb=disabled", "logging.progress=false",
                           f"output_dir={out}"], env=env_cpu, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["losses"][-1] < report["losses"][0]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if "attn_kept_fraction" in m)
    assert first["attn_kept_fraction"] == 0.5 and first["aux_loss"] > 0
    # the balance loss of each of the 2 layers, logged apart (top_k = 1 when balanced, times balance_coef 0.01)
    parts = [first["aux/layer0"], first["aux/layer1"]]
    assert sum(parts) == pytest.approx(first["aux_loss"]) and all(0.005 < p < 0.05 for p in parts)


def test_auto_path_runs_all_heads_unless_a_routed_length_is_set():
    """``auto`` is ``all_heads`` (measured cheaper on CPU, RESULTS.md) unless ``routed_min_len`` is set; both
    give the naive result (test above), so the choice is only a cost."""
    ctx = AttentionContext(layer_idx=0, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=8, model_dim=16)
    assert build_attention("moh", {}, ctx).resolve_path(1 << 20) == "all_heads"
    core = build_attention("moh", {"routed_min_len": 1024}, ctx)
    assert (core.resolve_path(1023), core.resolve_path(1024)) == ("all_heads", "routed")
    assert build_attention("moh", {"path": "routed"}, ctx).resolve_path(8) == "routed"
    with pytest.raises(ConfigError, match="routed_min_len"):
        build_attention("moh", {"routed_min_len": -1}, ctx)
