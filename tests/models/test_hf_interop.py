"""Hugging Face interop: tiny random HF models -> longshard -> logits; and export back."""

from __future__ import annotations

import json

import pytest
import torch
from longshard.errors import ConfigError
from longshard.models.hf import load_hf_model
from longshard.models.hf_export import export_hf

transformers = pytest.importorskip("transformers")

# fp32 end to end; both sides compute the same ops in a different order -> ~1e-6 relative.
TOL = 1e-5


def _tiny_hf(arch: str, **extra):
    common = dict(
        vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
    )
    common.update(extra)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(head_dim=16, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # HF zero-inits some biases; randomise everything so each weight matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] in (16, 64) else 0.0))
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


ROPES = {
    "none": {},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                 "rope_theta": 10000.0}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 500000.0}},
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
}


@pytest.mark.parametrize(
    "arch,rope,tied",
    [("llama", "none", False), ("llama", "llama3", True), ("llama", "yarn", False), ("qwen2", "none", True),
     ("qwen2", "linear", False), ("qwen3", "none", False)],
)
def test_hf_logits_match(tmp_path, arch, rope, tied):
    torch.manual_seed(0)
    hf = _tiny_hf(arch, tie_word_embeddings=tied, **ROPES[rope])
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = load_hf_model(tmp_path / "hf").eval()
    tokens = torch.randint(0, 97, (2, 37))  # odd length
    with torch.no_grad():
        ref = hf(tokens).logits
        out = ours(tokens)
    assert _rel(ref, out) <= TOL, f"{arch}/{rope}: logits rel err {_rel(ref, out):.2e}"

    # export back and let transformers load it
    export_hf(ours, tmp_path / "export", max_shard_bytes=20_000)  # force a sharded index
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        again = back(tokens).logits
    assert _rel(ref, again) <= TOL, f"{arch}/{rope}: exported logits rel err {_rel(ref, again):.2e}"
    # and ours loads the sharded export
    ours2 = load_hf_model(tmp_path / "export").eval()
    with torch.no_grad():
        assert _rel(ref, ours2(tokens)) <= TOL


def test_hf_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        load_hf_model(tmp_path / "missing")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unsupported architecture model_type='gpt2'.*llama, qwen2, qwen3"):
        load_hf_model(tmp_path / "gpt2")
    hf = _tiny_hf("llama")
    hf.save_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights"):
        load_hf_model(tmp_path / "noweights")


def test_gated_conversion_is_exact_and_exports_with_its_gates(tmp_path):
    """Converting to gated attention with init_converted keeps the logits (bitwise: x0.5, x2); export writes
    the gates (and a sparse variant's own parameters) where longshard's transformers module swap reads them."""
    from longshard.models.attention import AttentionSpec
    from longshard.models.hf import dense_reference, init_converted

    torch.manual_seed(0)
    _tiny_hf("llama").save_pretrained(tmp_path / "hf", safe_serialization=True)
    plain = load_hf_model(tmp_path / "hf").eval()
    gated = load_hf_model(tmp_path / "hf", [AttentionSpec(name="dense", gate="headwise")]).eval()
    tokens = torch.randint(0, 97, (2, 37))
    with torch.no_grad():
        ref = plain(tokens)
        assert not torch.equal(gated(tokens), ref)  # random gate init: not the original
        init_converted(gated)
        assert torch.equal(gated(tokens), ref)  # gates at 1/2, wo doubled
        with dense_reference(gated):  # what the conversion gap compares with: the original computation
            assert torch.equal(gated(tokens), ref)
        with torch.no_grad():
            gated.layers[0].attention.wg.weight.normal_()  # trained gates: the reference still is the original
        assert not torch.equal(gated(tokens), ref)
        with dense_reference(gated):
            assert torch.equal(gated(tokens), ref)
    # gates and a variant's own parameters are exported under self_attn.longshard and load back with
    # hf_swap.from_pretrained as trained; --drop-gates gives plain transformers the projections only
    from longshard.models import hf_swap

    export_hf(gated, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["longshard_attention"] == {
        "name": "dense", "options": {}, "gate": "headwise"}
    back = hf_swap.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _rel(gated(tokens), back(tokens).logits) <= TOL  # the trained (non-zero) gates too
    export_hf(gated, tmp_path / "dropped", drop_gates=True)
    assert "longshard_attention" not in json.loads((tmp_path / "dropped" / "config.json").read_text())
    nosa = load_hf_model(tmp_path / "hf", [AttentionSpec(name="nosa", options={"block": 8})]).eval()
    export_hf(nosa, tmp_path / "nosa_out")
    back = hf_swap.from_pretrained(tmp_path / "nosa_out").eval()
    with torch.no_grad():
        assert _rel(nosa(tokens), back(tokens).logits) <= TOL  # NOSA's importance score travels with it


def test_damaged_or_unsafe_hf_checkpoints_are_named(tmp_path, monkeypatch):
    """A truncated safetensors file, a bad config.json, a damaged shard index and a
    pickle .bin that would import code are ConfigErrors naming the file (and key) and the fix, raised by
    the check that runs before any weight is read; the payload never runs."""
    from longshard.models.hf import check_hf_checkpoint

    hf = _tiny_hf("llama")
    good = tmp_path / "good"
    hf.save_pretrained(good, safe_serialization=True)
    check_hf_checkpoint(good)

    def variant(name: str):
        import shutil

        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    cut = variant("cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"model\.safetensors is truncated: \d+ bytes, its header describes \d+"):
        check_hf_checkpoint(cut)
    with pytest.raises(ConfigError, match="truncated"):  # the loader runs the same check
        load_hf_model(cut)
    (cut / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        check_hf_checkpoint(cut)

    bad_json = variant("bad_json")
    (bad_json / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON \(line 1, column \d+"):
        check_hf_checkpoint(bad_json)
    for key, value, message in (("num_attention_heads", None, "has no 'num_attention_heads'"),
                                ("hidden_size", "64", "hidden_size='64' is not an integer"),
                                ("rms_norm_eps", [1e-6], "rms_norm_eps=.* is not a number")):
        cfg = json.loads((good / "config.json").read_text())
        cfg[key] = value
        (bad_json / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConfigError, match=message):
            load_hf_model(bad_json)

    sharded = tmp_path / "sharded"
    export_hf(load_hf_model(good), sharded, max_shard_bytes=20_000)
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ConfigError, match="has no 'weight_map'"):
        check_hf_checkpoint(sharded)

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, ("touch PWNED_BY_CHECKPOINT",))

    pickled = variant("pickled")
    (pickled / "model.safetensors").unlink()
    sd = dict(hf.state_dict())
    torch.save(sd, pickled / "pytorch_model.bin")
    load_hf_model(pickled)  # a plain tensor pickle loads (weights_only=True)
    monkeypatch.chdir(tmp_path)
    torch.save({"model.embed_tokens.weight": Payload()}, pickled / "pytorch_model.bin")  # zip format: scanned
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin.*(posix|os)\.system.*safe_serialization=True"):
        check_hf_checkpoint(pickled)
    # legacy (pre-zip) torch format: not scannable, refused by the weights_only load itself
    torch.save({"model.embed_tokens.weight": Payload()}, pickled / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin.*(posix|os)\.system.*safe_serialization=True"):
        load_hf_model(pickled)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_every_transformers_config_key_is_classified():
    """Each key transformers writes for Llama / Qwen2 / Qwen3 is mapped, refused at values longshard does
    not implement, or listed as having no effect on the forward: a key added by a newer transformers
    fails here until someone decides which (the loader only warns about it)."""
    from longshard.models.hf import HF_MAPPED_KEYS, HF_NO_EFFECT_KEYS, HF_REFUSED_UNLESS

    known = HF_MAPPED_KEYS | HF_NO_EFFECT_KEYS | set(HF_REFUSED_UNLESS)
    for cls in (transformers.LlamaConfig, transformers.Qwen2Config, transformers.Qwen3Config):
        keys = set(cls().to_dict())
        assert keys <= known, f"{cls.__name__}: unclassified {sorted(keys - known)}"


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
MAPPED = [  # (arch, config keys): logits must equal transformers' (and the export must load back equal)
    ("llama", {"rope_parameters": {**YARN, "truncate": False}}),
    ("llama", {"rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}}),
    ("qwen2", {"rope_parameters": {**YARN, "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0}}),
    ("llama", {"attention_bias": True}),
    ("qwen3", {"attention_bias": True}),
    ("llama", {"head_dim": 32}),
    ("qwen2", {"rms_norm_eps": 1e-3, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
]


@pytest.mark.parametrize("arch,extra", MAPPED, ids=[f"{a}-{sorted(e)[0]}-{i}" for i, (a, e) in enumerate(MAPPED)])
def test_hf_keys_that_change_the_forward_are_mapped(tmp_path, arch, extra):
    torch.manual_seed(0)
    hf = _tiny_hf(arch, **extra)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = load_hf_model(tmp_path / "hf").eval()
    tokens = torch.randint(0, 97, (2, 45))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert _rel(ref, ours(tokens)) <= TOL, f"{arch} {extra}: rel err {_rel(ref, ours(tokens)):.2e}"
    export_hf(ours, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert _rel(ref, back(tokens).logits) <= TOL


REFUSED = [  # (arch, keys written into config.json, the error names)
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     r"rope_scaling\.rope_type='dynamic'"),
    ("llama", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0],
                                   "rope_theta": 10000.0}}, r"rope_scaling\.rope_type='longrope'"),
    ("llama", {"rope_parameters": {**YARN, "low_freq_factor": 1.0}}, r"rope_scaling\.low_freq_factor"),
    ("llama", {"partial_rotary_factor": 0.5}, r"rope_scaling\.partial_rotary_factor=0\.5"),
    ("llama", {"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ("llama", {"mlp_bias": True}, r"mlp_bias=True"),
    ("qwen2", {"use_sliding_window": True}, r"use_sliding_window=True"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, r"layer_types has sliding_attention"),
    ("qwen3", {"attention_dropout": 0.1}, r"attention_dropout=0\.1"),
]


@pytest.mark.parametrize("arch,extra,message", REFUSED, ids=[m.split("\\")[-1][:24] for _, _, m in REFUSED])
def test_hf_keys_longshard_cannot_honour_are_refused(tmp_path, arch, extra, message):
    hf = _tiny_hf(arch)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(extra)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        load_hf_model(tmp_path / "hf")


def test_unknown_hf_keys_are_named_in_a_warning(tmp_path, caplog):
    hf = _tiny_hf("llama")
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["new_fancy_norm"] = True
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        load_hf_model(tmp_path / "hf")
    assert "new_fancy_norm" in caplog.text
