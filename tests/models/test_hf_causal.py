"""``init.hf_model=transformers``: a transformers causal LM built from a folder and run by longshard's trainer
(:mod:`longshard.models.hf_causal`).

Dense through the adapter equals transformers' ``sdpa`` (summed loss, logits and every gradient; fp32 and
bf16; Llama, Qwen2 14/2, Qwen3, Mistral 4/1; odd length); packed documents given as ids equal each
document run alone; a sparse variant equals the same model under ``attn_implementation="longshard"`` (the
mask path); what a variant adds starts at the checkpoint's logits and the dense reference is the
checkpoint exactly; the cores follow ``to``/``train``; what cannot run is refused by name.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel
from hf_helpers import tiny_hf
from longshard.errors import ConfigError

transformers = pytest.importorskip("transformers")
from longshard.models import hf_causal  # noqa: E402
from longshard.models.attention import AttentionSpec  # noqa: E402
from longshard.models.hf import read_hf_config  # noqa: E402
from longshard.models.model import IGNORE_INDEX  # noqa: E402

# fp32: transformers' own layers on both sides, SDPA against our dense kernel (same math, another op order)
# -> ~1e-6; 2e-5 leaves margin and still catches a wrong mask or position (>1e-2). bf16: 8 mantissa bits
# over 2 layers -> 4e-2 (gradients x5: sums over more terms).
TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}
S2 = {"name": "s2", "options": {"block": 4, "local_blocks": 2, "vert_stride": 2}}


def _folder(tmp_path, arch="mistral", heads=(4, 2), **extra):
    model = tiny_hf(arch, heads, **extra).eval()
    model.save_pretrained(tmp_path / arch)
    return model, tmp_path / arch


def _adapter(path, spec: dict | None = None, **kw):
    specs = [AttentionSpec(name=spec["name"], options=dict(spec.get("options", {})), gate=spec.get("gate", "none"))] \
        if spec else []
    return hf_causal.build(path, hf_causal.model_config(read_hf_config(path), specs), **kw)


def _tokens(S=45, B=2, vocab=97):
    tok = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tok, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    return tok, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch,heads", [("llama", (4, 2)), ("qwen2", (14, 2)), ("qwen3", (4, 2)), ("mistral", (4, 1))])
def test_dense_loss_and_every_gradient_equal_transformers_sdpa(tmp_path, arch, heads, dtype):
    ref, path = _folder(tmp_path, arch, heads)
    ref.set_attn_implementation("sdpa")
    ours = _adapter(path)
    tok, labels = _tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = ref(tok).logits
        want = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        got = ours(tok, labels_BS=labels)
    want.backward()
    got.loss_sum.backward()
    assert int(got.n_tokens) == 2 * 44
    assert_rel("loss", want.detach(), got.loss_sum.detach(), TOL[dtype])
    theirs = dict(ref.named_parameters())
    for name, p in ours.hf.named_parameters():
        assert_rel(f"grad {name}", theirs[name].grad, p.grad, 5 * TOL[dtype])
    with torch.no_grad():
        assert_rel("logits", ref(tok).logits, ours(tok), TOL[torch.float32])


@pytest.mark.parametrize("spec", [{"name": "dense"}, S2], ids=["dense", "s2"])
def test_documents_as_ids_equal_each_document_alone_and_the_mask_path(tmp_path, spec):
    """Packed rows (documents of 20 and 25 tokens, positions restarting) equal the same model under
    attn_implementation=longshard reading documents off position_ids; dense ones also equal the documents
    run one by one (a block-sparse pattern is laid over the packed row's positions, as in our own model)."""
    import longshard.models.hf_attention  # noqa: F401 - registers "longshard"

    _, path = _folder(tmp_path)
    ours = _adapter(path, spec).eval()
    tok, _ = _tokens()
    doc = torch.zeros_like(tok)
    doc[:, 20:] = 1
    with torch.no_grad():
        packed = ours(tok, doc_ids_BS=doc)
        alone = torch.cat([ours(tok[:, :20]), ours(tok[:, 20:])], dim=1)
        masked = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="longshard").eval()
        masked.config.longshard_attention = spec
        positions = torch.cat([torch.arange(20), torch.arange(25)]).expand(2, 45)
        via_mask = masked(tok, position_ids=positions).logits
    if spec["name"] == "dense":
        assert_rel("packed vs alone", alone, packed, TOL[torch.float32])
    assert_rel("ids vs mask path", via_mask, packed, TOL[torch.float32])


@pytest.mark.parametrize("spec", [{"name": "dense", "gate": "headwise"},
                                  {"name": "dma", "options": {"block": 4, "keep_blocks": 12}},
                                  {**S2, "gate": "elementwise"}], ids=["gated", "dma", "s2_gated"])
def test_what_a_variant_adds_starts_at_the_checkpoint_and_the_dense_reference_is_the_checkpoint(tmp_path, spec):
    """Gates start at sigmoid(0) = 1/2 with o_proj doubled (exact); the dense reference (gates fixed at 1/2,
    dense cores) is the checkpoint as it ran whatever the variant. DMA keeping 12 blocks of 4 keys (all 45) with
    A = 0 (no bias) starts at the checkpoint too."""
    ref, path = _folder(tmp_path)
    ref.set_attn_implementation("sdpa")
    ours = _adapter(path, spec).eval()
    tok, _ = _tokens()
    with torch.no_grad():
        want = ref(tok).logits
        with ours.dense_reference():
            assert_rel("dense reference", want, ours(tok), TOL[torch.float32])
        if spec["name"] != "s2":
            assert_rel("start", want, ours(tok), TOL[torch.float32])
    assert any(".longshard." in n for n, _ in ours.hf.named_parameters())  # the added weights train
    if spec["name"] == "s2":  # the reference context restored the sparse cores
        with torch.no_grad():
            assert float((ours(tok) - want).abs().max()) > 1e-3


def test_cores_beside_the_model_follow_to_and_train(tmp_path):
    """A parameter-free variant's core (streaming: a head-index buffer) lives beside the transformers model;
    ``to`` and ``train``/``eval`` reach it."""
    _, path = _folder(tmp_path)
    ours = _adapter(path, {"name": "streaming", "options": {"sink": 2, "window": 8, "retrieval_heads": [0],
                                                            "block": 4}})
    cores = [layer.attention.core_attention for layer in ours.layers]
    assert all(c not in set(ours.modules()) for c in cores)
    ours.eval()
    assert not any(c.training for c in cores)
    ours.train()
    assert all(c.training for c in cores)
    ours.to("meta")
    assert all(b.device.type == "meta" for c in cores for b in c.buffers())


def test_a_missing_weight_and_what_cannot_run_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _folder(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        _adapter(path)
    with pytest.raises(ConfigError, match="init.rope_scaling"):
        hf_causal.model_config(read_hf_config(path), [], "ntk", 4.0)


@pytest.mark.parametrize("override,field", [
    ("parallel.tp_degree=2", "parallel.tp_degree"),
    ("train.engine=deepspeed", "train.engine"),
    ("train.activation_checkpointing=attention_boundary", "train.activation_checkpointing"),
    ("train.activation_offload=kv", "train.activation_offload"),
])
def test_settings_a_transformers_model_cannot_run_are_refused_before_work(tmp_path, override, field):
    from longshard.train.config import load_config

    _, path = _folder(tmp_path)
    base = ["init.hf_model=transformers", f"init.hf_path={path}", "train.nproc=2", "train.seq_len=64"]
    load_config("tiny_lm", base)  # the base is valid
    with pytest.raises(ConfigError) as e:
        load_config("tiny_lm", [*base, override])
    assert e.value.field == field and "init.hf_model=transformers" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("tiny_lm", ["init.hf_model=transformers"])
    assert e.value.field == "init.hf_model"
