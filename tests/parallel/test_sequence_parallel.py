"""Sequence parallelism on gloo (Ulysses, ring, the sparsity-aware exchange, hybrid): sharded == unsharded
(outputs and every gradient, tests/dist/*_check.py), and training losses equal sp=1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, torchrun_cmd
from longshard.errors import ConfigError
from longshard.train.config import load_config

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("nproc,script", [  # Ulysses on 3 ranks (14 s) runs with -m slow; the rings keep 3
    (n, s) if (n, s) != (3, "ulysses_check.py") else pytest.param(n, s, marks=pytest.mark.slow)
    for s in ("ulysses_check.py", "ring_check.py", "sparse_ring_check.py") for n in (2, 3, 4)])
def test_sharded_matches_single_process(script, nproc, env_cpu):
    proc = subprocess.run(torchrun_cmd(nproc, str(REPO / "tests" / "dist" / script)), env=env_cpu,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_hybrid_matches_single_process(env_cpu):
    proc = subprocess.run(torchrun_cmd(4, str(REPO / "tests" / "dist" / "hybrid_check.py")), env=env_cpu,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


ATTENTION = {"ring_s2": "[{name: s2, options: {block: 8, local_blocks: 2, vert_stride: 2}}]",
             "ring_linear": "[{name: linear, options: {chunk: 8}}, {name: dense}]",
             "hybrid": "[{name: s2, options: {block: 8, local_blocks: 2, vert_stride: 2}}, {name: dense}]"}


@pytest.mark.parametrize("mode", ["ulysses", "ring", "hybrid", "ring_s2", "ring_linear"])
def test_sp_training_equals_sp1(tmp_path, env_cpu, mode):
    from longshard.train.data import prepare_default

    prepare_default(tmp_path / "data", 200_000)
    common = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              f"model.attention={ATTENTION.get(mode, '[{name: dense}]')}", "train.seq_len=64",
              "train.micro_batch_size=2",
              "train.global_batch_size=4", "train.steps=3", "logging.wandb=disabled", "logging.progress=false",
              "eval.passkey_samples=1", "eval.passkey_lengths=[128]", "eval.val_batches=2",
              "data.source=prepared", f"data.path={tmp_path / 'data'}"]
    one = subprocess.run([sys.executable, "-m", "longshard.train.main", "tiny_lm", *common,
                          f"output_dir={tmp_path / 'sp1'}"], env=env_cpu, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    # hybrid also shards parameters (FSDP2 over the flattened ring x Ulysses group)
    layout = ["parallel.sp_degree=4", "parallel.sp_ulysses_degree=2", "parallel.dp_mode=fsdp2"] \
        if mode == "hybrid" else ["parallel.sp_degree=2"]
    two = subprocess.run(torchrun_cmd(4 if mode == "hybrid" else 2, "-m", "longshard.train.main", "tiny_lm",
                                      *common, *layout, f"parallel.sp_mode={mode.split('_')[0]}",
                                      # remat-aware checkpointing: same numerics, attention not recomputed
                                      "train.activation_checkpointing=attention_boundary",
                                      f"output_dir={tmp_path / 'sp2'}"),
                         env=env_cpu, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "sp1" / "report.json").read_text())
    b = json.loads((tmp_path / "sp2" / "report.json").read_text())
    assert b["sp_degree"] == (4 if mode == "hybrid" else 2)
    for x, y in zip(a["losses"], b["losses"]):
        assert abs(x - y) / x <= 1e-5, (a["losses"], b["losses"])
    assert abs(a["val_loss"] - b["val_loss"]) / a["val_loss"] <= 1e-5
    assert a["passkey_acc@128"] == b["passkey_acc@128"]
    metrics = [json.loads(x) for x in (tmp_path / "sp2" / "metrics.jsonl").read_text().splitlines()]
    key = {"ulysses": "all_to_all", "ring_s2": "sparse_kv", "ring_linear": "all_gather"}.get(mode, "ring_p2p")
    assert metrics[0][f"comm/{key}_calls"] > 0
    if mode == "hybrid":
        assert metrics[0]["comm/all_to_all_calls"] > 0


def test_sp_layout_errors():
    with pytest.raises(ConfigError, match="train.seq_len.*sp_degree=3"):
        load_config("tiny_lm", ["parallel.sp_degree=3"])  # 256 tokens
    with pytest.raises(ConfigError, match="train.seq_len.*divisible by 8.*ring"):
        load_config("tiny_lm", ["parallel.sp_degree=4", "parallel.sp_mode=ring", "train.seq_len=260",
                                   "eval.passkey_lengths=[512]"])
    with pytest.raises(ConfigError, match="parallel.sp_mode"):
        load_config("tiny_lm", ["parallel.sp_mode=ring9"])
    # sparsity-aware ring: whole blocks in each of the 2 x sp zigzag chunks; unsupported variants named
    with pytest.raises(ConfigError, match="train.seq_len.*divisible by 192"):
        load_config("tiny_lm", ["parallel.sp_degree=2", "parallel.sp_mode=ring",
                                   "model.attention=[{name: s2, options: {block: 48}}]"])
    with pytest.raises(ConfigError, match="parallel.sp_mode.*'nsa'.*ulysses"):
        load_config("tiny_lm", ["parallel.sp_degree=2", "parallel.sp_mode=ring", "model.attention=[{name: nsa}]"])
    with pytest.raises(ConfigError, match="parallel.sp_mode.*'mixed'.*ulysses"):
        load_config("tiny_lm", ["parallel.sp_degree=4", "parallel.sp_mode=hybrid", "parallel.sp_ulysses_degree=2",
                                   "model.attention=[{name: mixed, options: {groups: [{name: dense, heads: 6}]}}]"])
    # hybrid: block-sparse layers need whole blocks in the 2 x (sp / ulysses) zigzag chunks of the ring
    with pytest.raises(ConfigError, match="train.seq_len.*divisible by 384"):
        load_config("tiny_lm", ["parallel.sp_degree=4", "parallel.sp_mode=hybrid", "parallel.sp_ulysses_degree=2",
                                   "model.attention=[{name: s2, options: {block: 96}}]"])
    with pytest.raises(ConfigError, match="parallel.sp_mode.*streaming_gated"):
        load_config("tiny_lm", ["parallel.sp_degree=2", "parallel.sp_mode=ring",
                                   "model.attention=[{name: streaming_gated}]"])
    with pytest.raises(ConfigError, match="parallel.sp_ulysses_degree"):
        load_config("tiny_lm", ["parallel.sp_mode=hybrid", "parallel.sp_degree=4", "parallel.sp_ulysses_degree=3"])


def test_one_rank_ring_equals_the_dense_model():
    """A ring over one rank (hybrid with ring degree 1, or sp = 1) passes K/V to itself: outputs and
    every gradient equal the unwrapped model (fp32, 1e-5: same keys, chunked softmax)."""
    import copy

    import torch
    import torch.distributed as dist
    from helpers import assert_rel
    from longshard.models import ModelConfig, Transformer
    from longshard.parallel.ring import apply_ring

    fresh = not dist.is_initialized()
    if fresh:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
        ring = apply_ring(copy.deepcopy(ref), dist.group.WORLD)
        tokens = torch.randint(0, 64, (2, 22), generator=torch.Generator().manual_seed(1))
        doc = torch.cumsum((torch.rand(2, 22, generator=torch.Generator().manual_seed(2)) < 0.2).long(), 1)
        outs = []
        for m in (ref, ring):
            out = m(tokens, doc_ids_BS=doc, labels_BS=tokens)
            out.loss_sum.backward()
            outs.append(out.loss_sum.detach())
        assert_rel("loss", outs[0], outs[1], 1e-5)
        for (name, a), b in zip(ref.named_parameters(), ring.parameters(), strict=True):
            assert_rel(name, a.grad, b.grad, 1e-5)
    finally:
        if fresh:
            dist.destroy_process_group()
