"""Continue-training from Hugging Face checkpoints: weights loaded (whole or sharded under FSDP2), YaRN
context extension, conversions to other attention variants with their loss gap measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import torchrun_cmd
from train_runs import _losses, _run, _tiny_hf_llama

pytestmark = pytest.mark.dist


def test_continue_from_hf_starts_from_its_weights(tmp_path, data_dir, env_cpu):
    """Step-1 loss of a continue-train run equals the HF model's own loss on the same batch."""
    import torch
    from longshard.train.data import DistributedLoader, TokenWindows

    _tiny_hf_llama(tmp_path / "hf")
    extra = ["train.steps=1", f"init.hf_path={tmp_path / 'hf'}", "data.doc_mask=false", "eval.at_end=false"]
    _run(1, tmp_path / "cont", data_dir, extra, env_cpu)
    got = _losses(tmp_path / "cont")[0]

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    loader = DistributedLoader(TokenWindows(data_dir, "train", 64), micro_batch_size=2, grad_accum=4, dp_rank=0,
                               dp_size=1, seed=0)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in loader.next_step():
            logits = hf(b["tokens"]).logits
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum")
            total += float(ce)
            n += b["labels"].numel()
    assert abs(got - total / n) / (total / n) < 1e-5  # fp32, same weights and batch


def test_continue_with_yarn_extends_context(tmp_path, data_dir, env_cpu):
    """seq_len 4x the checkpoint's context trains with YaRN; without scaling it is rejected up front."""
    _tiny_hf_llama(tmp_path / "hf")
    base = ["train.steps=2", f"init.hf_path={tmp_path / 'hf'}", "train.seq_len=256", "eval.at_end=false"]
    bad = _run(1, tmp_path / "bad", data_dir, base, env_cpu, check=False)
    assert bad.returncode == 2 and "exceeds the checkpoint's context 64" in bad.stderr
    _run(1, tmp_path / "yarn", data_dir, [*base, "init.rope_scaling=yarn", "init.rope_factor=4"], env_cpu)
    saved = (tmp_path / "yarn" / "config.yaml").read_text()
    assert "scaling: yarn" in saved and "original_max_seq_len: 64" in saved and "max_seq_len: 256" in saved


@pytest.mark.parametrize("recipe,nproc,extra", [
    ("continue_hf_gated", 2, []),
    # the tiny Llama has 4 query heads: a stride of 4 lets them cover every block (the recipe ships 8)
    ("continue_hf_s2", 2, ["parallel.sp_degree=2", "model.attention=[{name: s2, options: {block: 64, "
                           "local_blocks: 16, vert_stride: 4}}]"]),
    # small blocks so 256 tokens have far blocks: the importance bias and the budget change the loss a little
    ("continue_hf_nosa", 1, ["model.attention=[{name: nosa, options: {block: 16, local_blocks: 2, query_blocks: 2, "
                             "static_blocks: 2}}]"]),
    # the tiny Llama's 4 heads: 1 shared + top-2 of 3 routed, zero routers
    ("continue_hf_moh", 2, ["model.attention=[{name: moh, options: {shared_heads: 1, top_k: 2, router_std: 0.0}}]",
                            "init.rope_scaling=yarn", "init.rope_factor=4.0"]),
])
def test_continue_recipes_convert_measure_the_gap_and_train(tmp_path, data_dir, env_cpu, recipe, nproc, extra):
    """Each shipped continue-training recipe converts a tiny HF Llama, reports the initial loss gap
    against the unconverted model on held-out data, and trains under its parallel layout."""
    _tiny_hf_llama(tmp_path / "hf")
    out = tmp_path / recipe
    args = [recipe, f"init.hf_path={tmp_path / 'hf'}", "data.source=prepared", f"data.path={data_dir}",
            f"output_dir={out}", "train.steps=2", "train.seq_len=256", "train.micro_batch_size=1",
            "train.global_batch_size=2", "train.dtype=fp32", "eval.passkey_samples=0", "eval.val_batches=1",
            "eval.every=0", "checkpoint.every=0", "logging.wandb=disabled", "logging.progress=false", *extra]
    cmd = torchrun_cmd(nproc, "-m", "longshard.train.main", *args) if nproc > 1 else \
        [sys.executable, "-m", "longshard.train.main", *args]
    proc = subprocess.run(cmd, env=env_cpu, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    gap = report["conversion"]
    assert gap is not None and len(report["losses"]) == 2
    assert gap["loss_gap"] == gap["converted_loss"] - gap["original_loss"]
    if recipe == "continue_hf_gated":
        assert gap["loss_gap"] == 0.0  # gates at sigmoid(0) = 1/2 with wo doubled: exact in fp32
    elif recipe == "continue_hf_s2":  # 256 tokens lie inside S2's 16 local blocks: the same attention
        assert abs(gap["loss_gap"]) < 1e-5 * gap["original_loss"]
    elif recipe == "continue_hf_moh":  # each token drops 1 of its 4 heads; the other 3 compute what they did
        assert gap["loss_gap"] != 0.0 and abs(gap["loss_gap"]) < 0.5 * gap["original_loss"]
    else:  # NOSA reads 6 of 16 blocks: a real but small gap for this random tiny model
        assert gap["loss_gap"] != 0.0 and abs(gap["loss_gap"]) < 0.05 * gap["original_loss"]


@pytest.mark.slow  # ~35 s measurement; the sharded path's e2e test stays in the default suite
def test_sharded_hf_load_halves_memory_and_keeps_the_model(tmp_path):
    """Under FSDP2 each rank reads only its shards of the HF checkpoint: peak memory of the
    load on each of 2 ranks is half that of 1 rank (+-15%), the shards equal the checkpoint's tensors and
    the sharded model's logits equal the model loaded whole (a 530 MB fp32 Llama-shaped checkpoint)."""
    import torch
    from helpers import REPO
    from longshard.models import ModelConfig, Transformer
    from longshard.models.hf_export import export_hf

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32000, dim=1024, n_layers=6, n_heads=16, n_kv_heads=4, ffn_hidden_dim=2816,
                      max_seq_len=512)
    export_hf(Transformer(cfg), tmp_path / "hf", max_shard_bytes=10**12)
    del cfg
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    peaks = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.json"
        proc = subprocess.run(torchrun_cmd(world, str(REPO / "tests" / "dist" / "sharded_load_check.py"),
                                           str(tmp_path / "hf"), str(out)), env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        records = json.loads(out.read_text())
        assert all(r["read_bytes"] == r["local_param_bytes"] for r in records)  # nothing beyond its shard
        peaks[world] = max(r["peak_bytes"] for r in records)
        whole = records[0]["whole_load_peak_bytes"]
    ratio = peaks[2] / peaks[1]
    assert 0.5 * 0.85 <= ratio <= 0.5 * 1.15, f"2-rank peak {peaks[2] / 1e6:.0f} MB vs 1-rank {peaks[1] / 1e6:.0f} MB"
    assert peaks[1] < 0.8 * whole  # and below the whole-model load (model + state dict)


def test_fsdp2_sharded_hf_load_trains_like_the_whole_load(tmp_path, data_dir, env_cpu):
    """The trainer's sharded path (FSDP2, continue_hf_s2 with the sparsity-aware ring over 2 ranks:
    meta build, shard reads, conversion gap measured sharded) gives the gap and losses of the whole-model
    path (DDP)."""
    _tiny_hf_llama(tmp_path / "hf")
    common = [f"init.hf_path={tmp_path / 'hf'}", "train.steps=2", "train.seq_len=256", "train.micro_batch_size=1",
              "train.global_batch_size=2", "train.dtype=fp32", "eval.passkey_samples=0", "eval.val_batches=1",
              "checkpoint.every=0", "parallel.sp_degree=2", "model.attention=[{name: s2, options: {block: 16, "
              "local_blocks: 2, vert_stride: 4}}]"]
    reports = {}
    for dp in ("ddp", "fsdp2"):
        out = tmp_path / dp
        args = ["continue_hf_s2", "data.source=prepared", f"data.path={data_dir}", f"output_dir={out}",
                "logging.wandb=disabled", "logging.progress=false", f"parallel.dp_mode={dp}", *common]
        proc = subprocess.run(torchrun_cmd(2, "-m", "longshard.train.main", *args), env=env_cpu,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert ("loaded sharded" in proc.stderr) == (dp == "fsdp2")
        reports[dp] = json.loads((out / "report.json").read_text())
    a, b = reports["ddp"], reports["fsdp2"]
    # fp32; FSDP2 reduce-scatters where DDP all-reduces: the same sums in another order (~1e-7)
    for k in ("original_loss", "converted_loss"):
        assert abs(a["conversion"][k] - b["conversion"][k]) <= 1e-5 * abs(a["conversion"][k])
    assert a["conversion"]["loss_gap"] != 0.0  # far blocks exist at 256 tokens with block 16
    for x, y in zip(a["losses"], b["losses"]):
        assert abs(x - y) <= 1e-5 * abs(x)

