"""Offloaded KV decoding: equals full-cache decoding, bounded device KV, byte accounting, locality, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_rel
from longshard.errors import ConfigError
from longshard.models import InferenceCache, ModelConfig, Transformer
from longshard.models.offload import OffloadedCache, generate

# offloaded vs full cache: the same fp32 softmax over the same keys, gathered in another order -> ~1e-7.
TOL = 1e-6

NOSA = {"block": 4, "sink_blocks": 1, "local_blocks": 2, "query_blocks": 2, "static_blocks": 2}
VARIANTS = {
    "nosa": [{"name": "nosa", "options": NOSA}],
    "nosa-no-locality": [{"name": "nosa", "options": dict(NOSA, locality=False)}],
    "s2": [{"name": "s2", "options": {"block": 4, "local_blocks": 2, "vert_stride": 2}}],
    "sliding_window": [{"name": "sliding_window", "options": {"block": 4, "window": 6, "sink": 3}}],
    "streaming": [{"name": "streaming", "options": {"block": 4, "sink": 4, "window": 7}}],
    "nosa+dense": [{"name": "nosa", "options": NOSA}, {"name": "dense", "gate": "headwise"}],
}


def _model(attention, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512,
                                    attention=attention)).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "importance_w"):  # a trained-looking importance score (static choice matters)
                m.importance_w.normal_(0, 1.0)
    return model


def _decode(model, tokens, prefix, cache):
    with torch.no_grad():
        out = [model(tokens[:, :prefix], cache=cache)]
        for t in range(prefix, tokens.shape[1]):
            out.append(model(tokens[:, t : t + 1], cache=cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_offloaded_decoding_equals_full_cache(name):
    model = _model(VARIANTS[name])
    tokens = torch.randint(0, 64, (2, 75), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(tokens)
    full = _decode(model, tokens, 21, InferenceCache())
    cache = OffloadedCache(cache_blocks=12)
    off = _decode(model, tokens, 21, cache)
    assert_rel("offloaded vs full-cache logits", full, off, TOL)
    assert_rel("offloaded vs one-pass logits", whole, off, 2e-5)  # one pass uses the gather/banded paths
    st = cache.stats
    assert st.decode_steps == 75 - 21 and st.misses > 0 and st.hits > 0
    # every miss moved one K block and one V block of block x head_dim fp32 values
    assert st.h2d_bytes == st.misses * 2 * 4 * 8 * 4
    assert st.full_kv_layers == ({1} if name == "nosa+dense" else set())


def test_device_kv_stays_bounded_while_host_kv_grows():
    model = _model(VARIANTS["nosa"])
    sizes = []
    for length in (64, 256):
        tokens = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(2))
        cache = OffloadedCache(cache_blocks=10)
        generate(model, tokens, 8, cache=cache)
        sizes.append((cache.device_kv_bytes(), cache.host_bytes()))
    (dev_short, host_short), (dev_long, host_long) = sizes
    assert host_long > 3 * host_short
    # slots and tail are fixed; only the mean key per block (1/block of the KV) grows
    assert dev_long - dev_short <= (host_long - host_short) / 4 / 2


def test_locality_lowers_bytes_per_step():
    """Same weights, same budget: NOSA's query-agnostic part keeps far blocks resident between steps."""
    per_step = {}
    for name in ("nosa", "nosa-no-locality"):
        model = _model([{"name": "nosa", "options": dict(VARIANTS[name][0]["options"], block=8, static_blocks=4)}])
        tokens = torch.randint(0, 64, (1, 300), generator=torch.Generator().manual_seed(3))
        cache = OffloadedCache(cache_blocks=12)
        generate(model, tokens, 48, cache=cache)
        per_step[name] = cache.stats.h2d_bytes / cache.stats.decode_steps
        assert cache.stats.decode_steps == 47
    assert per_step["nosa"] < 0.6 * per_step["nosa-no-locality"], per_step


def test_generate_matches_a_greedy_loop():
    model = _model(VARIANTS["s2"])
    prompt = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(4))
    new = generate(model, prompt, 12, cache=OffloadedCache(cache_blocks=16))
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(new, seq[:, 30:])


def test_cache_too_small_is_a_clear_error():
    model = _model(VARIANTS["nosa"])
    tokens = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ConfigError, match=r"offload.cache_blocks.*at least 7"):
        generate(model, tokens, 4, cache=OffloadedCache(cache_blocks=4))  # 1 sink + 2 local + 4 far = 7
    with pytest.raises(ConfigError, match="offload.cache_blocks"):
        OffloadedCache(cache_blocks=0)


def test_generate_cli_with_offload(tmp_path):
    """`longshard generate` on a NOSA checkpoint: the same text with and without host-memory KV."""
    import torch.distributed.checkpoint as dcp
    from longshard.train.checkpoint import CONFIG_FILE
    from longshard.train.config import dump_config, load_config

    attention = json.dumps([{"name": "nosa", "options": NOSA}])
    cfg = load_config("tiny_lm", [f"model.attention={attention}"])
    model = Transformer(cfg.model)
    ckpt = tmp_path / "step_00000001"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    (ckpt / CONFIG_FILE).write_text(dump_config(cfg))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    results = []
    for extra in ([], ["--offload-cache-blocks", "9"]):
        proc = subprocess.run([sys.executable, "-m", "longshard.cli", "generate", str(ckpt), "--prompt",
                               "The quick brown fox jumps over the lazy dog. " * 3, "--max-new-tokens", "12", *extra],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout))
    plain, off = results
    assert plain["new_tokens"] == off["new_tokens"] == 12
    assert plain["text"] == off["text"]
    assert off["offload"]["h2d_bytes"] > 0 and off["offload"]["host_kv_bytes"] > 0
    proc = subprocess.run([sys.executable, "-m", "longshard.cli", "generate", str(ckpt)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0 and "--prompt" in proc.stderr


def test_dense_model_reports_no_hit_rate():
    """Friction 8: with every layer dense nothing is offloaded and no block is looked up: the hit rate
    is None (reported null), not a perfect 1.0."""
    from longshard.models.offload import OffloadedCache, generate

    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=128)).eval()
    cache = OffloadedCache(4)
    generate(model, torch.randint(0, 64, (1, 20)), 5, cache=cache)
    assert cache.stats.hit_rate is None and cache.stats.full_kv_layers == {0, 1}
    assert cache.stats.snapshot()["hit_rate"] is None


# --- training-side offload ----------------------------------------------------------------------
TRAIN_VARIANTS = {
    "dense": [{"name": "dense"}],
    "nosa": [{"name": "nosa", "options": dict(NOSA, block=8)}],
    "s2": [{"name": "s2", "options": {"block": 8, "local_blocks": 2, "vert_stride": 2}}],
    "s2-banded": [{"name": "s2", "options": {"block": 8, "local_blocks": 2, "vert_stride": 2, "path": "banded"}}],
}


def _grads_and_bytes(attention, mode, checkpointing="none"):
    from longshard.models.activation_offload import SavedTensorMeter

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                                    attention=attention))
    model.set_activation_offload(mode)
    model.set_activation_checkpointing(checkpointing)
    tokens = torch.randint(0, 64, (2, 99), generator=torch.Generator().manual_seed(1))
    with SavedTensorMeter() as meter:
        if model.activation_offload is not None:
            model.activation_offload.meter = meter
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    moved = model.activation_offload.offloaded_bytes if model.activation_offload is not None else 0
    return [p.grad for p in model.parameters()], meter.bytes, moved


@pytest.mark.parametrize("name", list(TRAIN_VARIANTS))
@pytest.mark.parametrize("checkpointing", ["none", "attention_boundary"])
def test_activation_offload_keeps_gradients_and_lowers_device_bytes(name, checkpointing):
    ref_grads, ref_bytes, _ = _grads_and_bytes(TRAIN_VARIANTS[name], "none", checkpointing)
    for mode in ("kv", "attention"):
        grads, dev_bytes, moved = _grads_and_bytes(TRAIN_VARIANTS[name], mode, checkpointing)
        for a, b in zip(ref_grads, grads):
            assert torch.equal(a, b), f"{mode}: gradients changed"  # the same values come back
        if mode == "attention" or name != "s2-banded":  # the banded path saves padded K/V copies, not K/V
            assert moved > 0 and dev_bytes < ref_bytes, (mode, dev_bytes, ref_bytes)
        # what left the device is what the offload moved (distinct storages on both sides)
        assert ref_bytes - dev_bytes == moved if mode == "kv" else ref_bytes - dev_bytes <= moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory; CPU runs use allocation counting")
def test_activation_offload_lowers_cuda_peak_memory():
    results = {}
    for mode in ("none", "attention"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                                        max_seq_len=4096, attention=[{"name": "dense"}])).cuda()
        model.set_activation_offload(mode)
        tokens = torch.randint(0, 256, (2, 4097), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.cuda.synchronize()
        results[mode] = (torch.cuda.max_memory_allocated() - base, [p.grad.cpu() for p in model.parameters()])
    assert results["attention"][0] < results["none"][0]
    for a, b in zip(results["none"][1], results["attention"][1]):
        assert torch.equal(a, b)


def test_activation_offload_config_errors():
    from longshard.train.config import load_config

    with pytest.raises(ConfigError, match="train.activation_offload"):
        load_config("tiny_lm", ["train.activation_offload=disk"])
    with pytest.raises(ConfigError, match="train.activation_offload.*attention_boundary"):
        load_config("tiny_lm", ["train.activation_offload=kv", "train.activation_checkpointing=full"])


def test_decode_copy_in_orders_streams(monkeypatch):
    """Host->device block copies on the side stream first wait for the compute stream (the slots they
    overwrite may still be read by queued attention), and the compute stream waits for them after.
    The CUDA calls are recorded by stand-ins on CPU; the copies themselves run."""
    import contextlib

    from longshard.models.offload import OffloadStats, _LayerStore

    calls = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            calls.append(f"{self.name} waits {other.name}")

    compute, side = FakeStream("compute"), FakeStream("side")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)

    @contextlib.contextmanager
    def on(stream):
        calls.append(f"enter {stream.name}")
        yield
        calls.append(f"exit {stream.name}")

    monkeypatch.setattr(torch.cuda, "stream", on)
    k = torch.randn(1, 1, 32, 4)
    store = _LayerStore(k, k.clone(), block=8, cache_blocks=2, stats=OffloadStats(), pin=False)
    store.copy_stream = side
    slots = store.fetch(torch.tensor([[[0, 2]]]))
    assert calls == ["side waits compute", "enter side", "exit side", "compute waits side"]
    for n, j in enumerate((0, 2)):  # the slots now hold those host blocks
        assert torch.equal(store.slot_k[0, 0, int(slots[0, 0, n])], k[0, 0, j * 8 : (j + 1) * 8])
