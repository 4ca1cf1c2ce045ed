"""``attn_implementation="longshard"``: our variants inside transformers' Llama, Qwen2, Qwen3 and Mistral.

Dense equals transformers' ``sdpa``; each parameter-free variant equals our own ``Transformer`` on the
same weights (logits and every gradient), with GQA (14/2 and 4/2 heads), odd lengths, packed
documents and padding; what cannot run through the backend is refused by name; an exported sparse
model loads as trained and does not silently run dense without longshard.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_rel
from hf_helpers import tiny_hf
from longshard.errors import ConfigError

transformers = pytest.importorskip("transformers")
import longshard.models.hf_attention  # noqa: E402,F401  (registers "longshard")
from longshard.models.hf import config_from_hf, from_hf_name, load_into  # noqa: E402
from longshard.models.model import Transformer  # noqa: E402

# fp32: the same kernels (dense: SDPA on both sides) -> bitwise or ~1e-6; ours vs transformers' layers
# (norms, RoPE, MLP in a different op order) -> ~1e-6 relative, so 2e-5 leaves margin without hiding a
# wrong mask (which moves logits by >1e-2). bf16: 8 mantissa bits over 2 layers -> 4e-2.
TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}
VARIANTS = {
    "dense": {"name": "dense"},
    "s2_phi3": {"name": "s2", "options": {"block": 4, "local_blocks": 2, "vert_stride": 2}},
    "s2_dkernel": {"name": "s2", "options": {"block": 4, "local_blocks": 2, "vert_stride": 2,
                                             "phase_rule": "dkernel"}},
    "streaming": {"name": "streaming", "options": {"sink": 2, "window": 8, "retrieval_heads": [0], "block": 4}},
    "sliding_window": {"name": "sliding_window", "options": {"window": 9, "sink": 1, "block": 4}},
    "power": {"name": "power", "options": {"block": 4, "local_blocks": 2}},
}


def _hf(arch: str, heads: tuple[int, int] = (4, 2), attention: dict | list | None = None, **extra):
    return tiny_hf(arch, heads, attention, **extra)


def _ours(hf_model, spec: dict) -> Transformer:
    """Our Transformer with ``spec`` on ``hf_model``'s weights (Mistral's are named as Llama's)."""
    from longshard.models.attention import AttentionSpec

    d = hf_model.config.to_dict()
    d["model_type"] = "llama" if d["model_type"] == "mistral" else d["model_type"]
    cfg = config_from_hf(d, [AttentionSpec(name=spec["name"], options=dict(spec.get("options", {})))])
    ours = Transformer(cfg)
    load_into(ours, {from_hf_name(k): v for k, v in hf_model.state_dict().items() if from_hf_name(k)}, "hf")
    return ours


def _loss_and_grads(model, tokens, dtype, hf: bool, **kw):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(tokens, **kw).logits if hf else model(tokens, **kw)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits.float() * w).sum().backward()
    named = model.named_parameters()
    grads = {(from_hf_name(n) if hf else n): p.grad for n, p in named if p.grad is not None}
    return logits.detach().float(), grads


def _compare(ref, out, dtype, what):
    (l_ref, g_ref), (l_out, g_out) = ref, out
    assert_rel(f"{what} logits", l_ref, l_out, TOL[dtype])
    assert g_ref.keys() == g_out.keys(), (sorted(g_ref)[:5], sorted(g_out)[:5])
    for name in g_ref:
        assert_rel(f"{what} grad {name}", g_ref[name], g_out[name], TOL[dtype] * 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch,heads", [("llama", (4, 2)), ("qwen2", (14, 2)), ("qwen3", (4, 2)), ("mistral", (4, 1))])
def test_dense_equals_sdpa_with_every_gradient(arch, heads, dtype):
    model = _hf(arch, heads)
    tokens = torch.randint(0, 97, (2, 37))
    model.set_attn_implementation("sdpa")
    ref = _loss_and_grads(model, tokens, dtype, hf=True)
    model.set_attn_implementation("longshard")
    _compare(ref, _loss_and_grads(model, tokens, dtype, hf=True), dtype, f"{arch} dense vs sdpa")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch,heads", [("llama", (4, 2)), ("qwen2", (14, 2)), ("qwen3", (4, 2)), ("mistral", (4, 2))])
def test_each_parameter_free_variant_equals_our_transformer(arch, heads, variant):
    spec = VARIANTS[variant]
    model = _hf(arch, heads, attention=spec)
    model.set_attn_implementation("longshard")
    tokens = torch.randint(0, 97, (2, 37))  # odd, not a multiple of any block
    ref = _loss_and_grads(_ours(model, spec), tokens, torch.float32, hf=False)
    _compare(ref, _loss_and_grads(model, tokens, torch.float32, hf=True), torch.float32, f"{arch} {variant}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_documents_from_position_ids_equal_our_doc_mask(dtype):
    spec = VARIANTS["s2_phi3"]
    model = _hf("qwen2", (14, 2), attention=spec)
    model.set_attn_implementation("longshard")
    tokens = torch.randint(0, 97, (2, 41))
    lengths = [(13, 28), (41,)]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    doc_ids = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])
    ref = _loss_and_grads(_ours(model, spec), tokens, dtype, hf=False, doc_ids_BS=doc_ids,
                          position_ids_BS=position_ids)
    _compare(ref, _loss_and_grads(model, tokens, dtype, hf=True, position_ids=position_ids), dtype, "packed s2")
    # transformers derives packing from position_ids only without a cache; the backend always does
    _compare(ref, _loss_and_grads(model, tokens, dtype, hf=True, position_ids=position_ids, use_cache=False), dtype,
             "packed s2 (no cache)")


def test_padding_left_and_right_matches_sdpa_on_real_tokens():
    model = _hf("llama")
    tokens = torch.randint(0, 97, (3, 23))
    mask = torch.ones(3, 23, dtype=torch.long)
    mask[0, :6] = 0  # left padding
    mask[1, 17:] = 0  # right padding
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(tokens, attention_mask=mask).logits
        model.set_attn_implementation("longshard")
        out = model(tokens, attention_mask=mask).logits
    real = mask.bool()
    assert_rel("padded logits", ref[real], out[real], 1e-6)


def test_what_the_backend_cannot_run_is_refused_by_name():
    model = _hf("llama", attention={"name": "nsa"})
    model.set_attn_implementation("longshard")
    with pytest.raises(ConfigError, match=r"longshard_attention\[0\]: attention 'nsa' has parameters of its own"):
        model(torch.randint(0, 97, (1, 9)))
    typo = _hf("llama", attention={"name": "sliding_window", "options": {"windw": 3}})
    typo.set_attn_implementation("longshard")
    with pytest.raises(ConfigError, match=r"longshard_attention\.options\.windw: unknown option"):
        typo(torch.randint(0, 97, (1, 5)))
    windowed = _hf("mistral")
    windowed.config.sliding_window = 8  # Mistral's own window: a mask longshard would not apply
    windowed.set_attn_implementation("longshard")
    with pytest.raises(ConfigError, match="sliding_window"):
        windowed(torch.randint(0, 97, (1, 20)))


def test_an_exported_s2_model_loads_as_trained_and_never_silently_dense(tmp_path):
    """export-hf of an S2 model writes longshard_attention and attn_implementation into config.json:
    with the backend imported transformers gives our logits; without it, loading fails naming
    'longshard' (a ValueError from transformers), not a dense model."""
    from longshard.models.attention import AttentionSpec
    from longshard.models.config import ModelConfig
    from longshard.models.hf_export import export_hf

    torch.manual_seed(0)
    spec = VARIANTS["s2_phi3"]
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96, max_seq_len=128,
                      attention=[AttentionSpec(name="s2", options=spec["options"]), AttentionSpec(name="dense")])
    ours = Transformer(cfg).eval()
    export_hf(ours, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["attn_implementation"] == "longshard"
    assert written["longshard_attention"] == [{"name": "s2", "options": spec["options"]},
                                              {"name": "dense", "options": {}}]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config._attn_implementation == "longshard"
    tokens = torch.randint(0, 97, (2, 45))
    with torch.no_grad():
        assert_rel("exported s2 logits", ours(tokens), loaded(tokens).logits, TOL[torch.float32])
        loaded.set_attn_implementation("sdpa")  # what a silent dense load would give: far off
        assert float((ours(tokens) - loaded(tokens).logits).abs().max()) > 1e-3
    code = ("import transformers, sys\n"
            f"try:\n    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})\n"
            "except ValueError as e:\n    print('refused:', str(e)[:200]); sys.exit(0)\nsys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and 'attn_implementation="longshard"' in r.stdout, r.stdout + r.stderr[-2000:]


def test_a_trained_s2_checkpoint_exports_and_runs_as_trained_in_transformers(tmp_path, capsys):
    """`longshard train` an S2 model, `export-hf --verify`: transformers loads the folder with the backend
    (from config.json alone) and gives the checkpoint's logits (the check would fail by > 1e-3 if the
    export ran dense)."""
    from attack_helpers import SMALL_RUN
    from longshard.cli import main

    out = tmp_path / "run"
    s2 = "model.attention=[{name: s2, options: {block: 16, local_blocks: 2, vert_stride: 2}}, {name: dense}]"
    assert main(["train", *SMALL_RUN, "model.n_layers=2", s2, "train.steps=2", f"output_dir={out}"]) == 0
    capsys.readouterr()
    ckpt = out / "checkpoints" / "step_00000002"
    assert main(["export-hf", str(ckpt), "--output", str(tmp_path / "hf"), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "transformers (attn_implementation=longshard) gives the checkpoint's logits" in printed, printed
    err = float(printed.rsplit("max relative error ", 1)[1].split()[0])
    assert err <= 1e-4


@pytest.mark.parametrize("spec,exact", [
    ({"name": "dense", "gate": "elementwise"}, True), ({"name": "dense", "gate": "headwise"}, True),
    ({"name": "dma"}, False), ({"name": "nosa"}, False), ({"name": "streaming_gated"}, True),
])
def test_a_variant_with_parameters_added_to_qwen2_starts_at_its_logits_and_round_trips(tmp_path, spec, exact):
    """``hf_swap.add_longshard_attention`` adds gates (weights 0, o_proj doubled: exactly the original
    output) or a variant's own parameters (DMA with A = 0 and every key kept at this length, NOSA's
    importance bias near 0: within 1e-6); the added weights train and survive save_pretrained ->
    ``hf_swap.from_pretrained`` bit for bit."""
    from longshard.models import hf_swap

    model = _hf("qwen2", (14, 2))
    tokens = torch.randint(0, 97, (2, 37))
    with torch.no_grad():
        before = model.eval()(tokens).logits
    hf_swap.add_longshard_attention(model, spec)
    assert model.config._attn_implementation == "longshard"
    added = [n for n, _ in model.named_parameters() if ".longshard." in n]
    assert added, "nothing was added"
    with torch.no_grad():
        start = model(tokens).logits
    if exact:
        assert torch.equal(before, start) or float((before - start).abs().max()) <= 1e-6 * float(before.abs().max())
    else:
        assert_rel(f"{spec['name']} start", before, start, 1e-5)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if n in added and p.grad is None]
    # every added weight trains (NOSA's importance score only acts once blocks are dropped, beyond 37 tokens)
    assert not no_grad or spec["name"] == "nosa", no_grad
    opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = hf_swap.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert {n for n, _ in loaded.named_parameters() if ".longshard." in n} == set(added)


def test_a_swapped_folder_without_the_parts_weights_is_refused(tmp_path):
    from longshard.models import hf_swap

    model = _hf("llama")
    model.save_pretrained(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg["longshard_attention"] = {"name": "dense", "gate": "headwise"}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="lacks the weights of the longshard attention parts: model.layers.0"):
        hf_swap.from_pretrained(tmp_path / "plain")
    plain = _hf("llama", attention={"name": "dense", "gate": "headwise"})
    plain.set_attn_implementation("longshard")
    with pytest.raises(ConfigError, match=r"gate: output gates \(headwise\) add parameters"):
        plain(torch.randint(0, 97, (1, 5)))
