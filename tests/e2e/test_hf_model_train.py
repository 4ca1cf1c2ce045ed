"""``longshard train`` continues a Mistral-shaped transformers checkpoint (an architecture longshard does not
convert) with S2 at 4x its context (YaRN) and sequence parallel 2 (``init.hf_model=transformers``):

- the conversion gap is measured and reported (report.json ``conversion``), as for our own models;
- the ring (sparsity-aware exchange) run trains the losses of the one-process run (fp32: the sharded sums
  regroup, ~1e-7; 1e-5 catches a wrong shard, position or document) and reports its K/V traffic;
- a run resumed from a middle checkpoint trains the uninterrupted run's remaining losses (bitwise in
  practice);
- ``longshard eval`` of the final checkpoint gives the figures training reported for it, and
  ``export-hf --verify`` writes a folder that transformers loads as trained with the backend and refuses
  without it (never silently dense).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO
from hf_helpers import tiny_hf

pytestmark = pytest.mark.dist
pytest.importorskip("transformers")

RUN = ["quickstart", "init.hf_model=transformers", "init.rope_scaling=yarn", "init.rope_factor=4",
       "model.attention=[{name: s2, options: {block: 16, local_blocks: 2, vert_stride: 4}}]",
       "data.mqar_curriculum=[]", "train.log_every=2", "checkpoint.every=2", "logging.wandb=disabled",
       "logging.progress=false", "eval.mqar_samples=8", "eval.val_batches=2", "optim.warmup_steps=2"]


def _cli(*args: str, env: dict, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "longshard.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _report(path) -> dict:
    return json.loads((path / "report.json").read_text())


@pytest.mark.slow  # default suite under ~15 min on 2 cores: HF continue-training stays covered by
# test_continue_hf.py and sequence parallel under transformers by test_hf_trainer.py (53 s)
def test_longshard_train_continues_a_mistral_checkpoint_with_s2_and_sequence_parallel_2(tmp_path, env_cpu):
    model = tiny_hf("mistral", (4, 2), vocab=320, max_position_embeddings=64)
    model.save_pretrained(tmp_path / "mistral")
    env = {**env_cpu, "PYTHONPATH": str(REPO.parent)}
    run = [*RUN, f"init.hf_path={tmp_path / 'mistral'}"]
    _cli("train", *run, "train.steps=6", f"output_dir={tmp_path / 'sp2'}", env=env, cwd=tmp_path)
    _cli("train", *run, "train.steps=6", "train.nproc=1", "parallel.sp_degree=1", f"output_dir={tmp_path / 'sp1'}",
         env=env, cwd=tmp_path)
    sp2, sp1 = _report(tmp_path / "sp2"), _report(tmp_path / "sp1")
    conv = sp2["conversion"]
    assert set(conv) == {"original_loss", "converted_loss", "loss_gap"} and conv["original_loss"] > 0
    assert abs(conv["converted_loss"] - conv["original_loss"] - conv["loss_gap"]) < 1e-9
    assert abs(conv["converted_loss"] - sp1["conversion"]["converted_loss"]) < 1e-5 * conv["converted_loss"]
    assert len(sp2["losses"]) == 6 and sp2["sp_degree"] == 2
    assert max(abs(a - b) / abs(a) for a, b in zip(sp1["losses"], sp2["losses"])) < 1e-5, (sp1["losses"],
                                                                                          sp2["losses"])
    assert sp2["sp_traffic"]["saved_fraction"] > 0.5  # S2 layers exchange only the blocks their heads read

    # resume from the step-4 checkpoint into another folder: steps 5-6 as the uninterrupted run trained them
    step4 = tmp_path / "sp2" / "checkpoints" / "step_00000004"
    _cli("train", *run, "train.steps=6", f"checkpoint.resume={step4}", f"output_dir={tmp_path / 'resumed'}",
         env=env, cwd=tmp_path)
    resumed = _report(tmp_path / "resumed")
    assert resumed["resumed_from_step"] == 4
    assert max(abs(a - b) / abs(a) for a, b in zip(sp2["losses"][4:], resumed["losses"][4:])) < 1e-6

    ckpt = resumed["checkpoint"]
    got = json.loads(_cli("eval", ckpt, env=env, cwd=tmp_path).stdout)
    for key in [k for k in resumed if k.startswith("mqar_acc")]:
        assert got[key] == resumed[key], key

    out = _cli("export-hf", ckpt, "--output", str(tmp_path / "hf"), "--verify", env=env, cwd=tmp_path).stdout
    assert "attn_implementation=longshard" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["attn_implementation"] == "longshard" and config["longshard_attention"][0]["name"] == "s2"
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["max_position_embeddings"] == 256
    plain = subprocess.run([sys.executable, "-c", "from transformers import AutoModelForCausalLM as A; "
                            f"A.from_pretrained({str(tmp_path / 'hf')!r})"], env=env, capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)
    assert plain.returncode != 0 and "longshard" in plain.stderr
