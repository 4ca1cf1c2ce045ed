"""Memory that grows linearly in S: bytes each core attention saves for backward, per token, at S and 2S."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from helpers import REPO, torchrun_cmd
from longshard.models import ModelConfig, Transformer
from longshard.train.memory import saved_attention_bytes

PATHS = {  # the same names as benchmarks/memory_scale.py's paths
    "dense": [{"name": "dense"}],
    "dense_packed": [{"name": "dense"}],  # with 256-token documents
    "s2": [{"name": "s2", "options": {"block": 32, "local_blocks": 2, "vert_stride": 4,
                                      "allow_incomplete_coverage": True}}],
    "sliding_window": [{"name": "sliding_window", "options": {"block": 32, "window": 64}}],
    "linear": [{"name": "linear", "options": {"chunk": 32}}],
}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_attention_saved_bytes_per_token_flat(path, dtype):
    per_token = []
    for S in (512, 1024):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                        max_seq_len=S, attention=PATHS[path]))
        tokens = torch.randint(0, 64, (1, S))
        doc = torch.arange(S)[None] // 256 if path == "dense_packed" else None
        per_token.append(saved_attention_bytes(model, tokens, doc, dtype) / S)
    assert per_token[0] > 0
    assert per_token[1] <= 1.05 * per_token[0], per_token  # O(S) in total, not O(S^2)


@pytest.mark.dist
@pytest.mark.parametrize("nproc,modes,bf16", [  # both dtypes and both layouts in the default suite; the other
    (2, ["ulysses", "ring"], False), (4, ["hybrid"], True),  # two pairs (17 s each) run with -m slow
    pytest.param(2, ["ulysses", "ring"], True, marks=pytest.mark.slow),
    pytest.param(4, ["hybrid"], False, marks=pytest.mark.slow),
], ids=["sp2-fp32", "hybrid4-bf16", "sp2-bf16", "hybrid4-fp32"])
def test_sequence_parallel_saved_bytes_per_token_flat(tmp_path, env_cpu, nproc, modes, bf16):
    """Every path under Ulysses, the ring (dense ring, sparsity-aware exchange for s2/sliding window,
    linear state passing) and hybrid saves O(local tokens) for backward: bytes/token at S and 2S
    within 5% (benchmarks/memory_scale.py under torchrun writes the records)."""
    out = tmp_path / "sp.json"
    cmd = torchrun_cmd(nproc, str(REPO / "benchmarks" / "memory_scale.py"), "--lengths", "512", "1024",
                       "--sp", *modes, "--json", str(out), *(["--bf16"] if bf16 else []))
    proc = subprocess.run(cmd, env=env_cpu, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["sp_mode"], r["path"]) for r in rows} == {(m, p) for m in modes for p in PATHS}
    for mode in modes:
        for path in PATHS:
            by_len = {r["seq_len"]: r for r in rows if r["sp_mode"] == mode and r["path"] == path}
            small, large = by_len[512]["saved_bytes_per_token"], by_len[1024]["saved_bytes_per_token"]
            assert small > 0
            assert large <= 1.05 * small, (mode, path, small, large)
            assert {"path", "sp_mode", "seq_len", "saved_bytes_per_token", "peak_bytes"} <= set(by_len[512])
