"""DeepSpeed engine (CPU accelerator, gloo): ZeRO stages give the DDP losses, resume is exact,
sequence parallelism works under it, and bad settings are rejected before any work."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import REPO
from longshard.errors import ConfigError
from longshard.parallel.deepspeed_engine import deepspeed_config
from longshard.train.config import load_config
from train_runs import _losses, _run

pytestmark = pytest.mark.dist
pytest.importorskip("deepspeed", reason="deepspeed not installed (pip install 'longshard[deepspeed]')")

DS = ["train.engine=deepspeed"]


@pytest.fixture
def env_ds(env_cpu):
    # DeepSpeed JIT-builds a small shared-memory comm op on CPU: keep the build in the project
    return dict(env_cpu, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / "build" / "torch_extensions"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from longshard.train.data import prepare_default

    path = tmp_path_factory.mktemp("data") / "default"
    prepare_default(path, 300_000)
    return path


# ZeRO-3 (parameters sharded too) in the default suite; plain ZeRO-2 runs in the resume and SP tests;
# ZeRO-1 and ZeRO-2 with optimizer offload with -m slow
@pytest.mark.parametrize("stages", [((3, False),), pytest.param(((1, False), (2, True)), marks=pytest.mark.slow)])
def test_zero_stages_give_the_ddp_losses(tmp_path, data_dir, env_ds, stages):
    extra = ["train.steps=3", "checkpoint.save_final=false"]
    _run(2, tmp_path / "ddp", data_dir, extra, env_ds)
    ref = _losses(tmp_path / "ddp")
    for stage, offload in stages:
        out = tmp_path / f"zero{stage}{'_offload' if offload else ''}"
        _run(2, out, data_dir, [*extra, *DS, f"deepspeed.zero_stage={stage}", f"deepspeed.offload_optimizer={offload}"],
             env_ds)
        for i, (a, b) in enumerate(zip(ref, _losses(out))):
            # ZeRO reduce-scatters instead of all-reducing: same sums, possibly another order (~1e-7)
            assert abs(a - b) / abs(a) <= 1e-5, f"ZeRO-{stage} step {i + 1}: {b} vs DDP {a}"
        assert len(_losses(out)) == 3


def test_deepspeed_resume_is_exact(tmp_path, data_dir, env_ds):
    extra = [*DS, "deepspeed.zero_stage=2", "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3"]
    out = tmp_path / "r"
    _run(2, out, data_dir, extra, env_ds)
    straight = _losses(out)
    ckpts = out / "checkpoints"
    assert (ckpts / "step_00000002" / "deepspeed").is_dir()
    shutil.rmtree(ckpts / "step_00000004")
    (out / "report.json").unlink()
    _run(2, out, data_dir, [*extra, "checkpoint.resume=auto"], env_ds)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] == 2
    assert report["losses"] == straight


def test_sequence_parallel_under_deepspeed(tmp_path, data_dir, env_ds):
    extra = ["train.steps=2", "parallel.sp_degree=2", "checkpoint.save_final=false"]
    _run(2, tmp_path / "native", data_dir, extra, env_ds)
    _run(2, tmp_path / "ds", data_dir, [*extra, *DS], env_ds)
    for a, b in zip(_losses(tmp_path / "native"), _losses(tmp_path / "ds")):
        assert abs(a - b) / abs(a) <= 1e-5


def test_deepspeed_config_merge_and_errors(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "communication_data_type": "fp32"}))
    cfg = deepspeed_config(2, 4, 8, 1.0, 2, True, str(user))
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["communication_data_type"] == "fp32"  # user keys pass through
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ConfigError, match="deepspeed.config_file.*train_micro_batch_size_per_gpu=3"):
        deepspeed_config(2, 4, 8, 1.0, 2, False, str(user))
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage=3"):
        deepspeed_config(2, 4, 8, 1.0, 2, False, str(user))
    user.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="bf16.enabled"):
        deepspeed_config(2, 4, 8, 1.0, 2, False, str(user))


@pytest.mark.parametrize("overrides,field", [
    (["deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
    (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer"),
    (["deepspeed.config_file=/nonexistent.json"], "deepspeed.config_file"),
    ([*DS, "train.nan_policy=skip"], "train.nan_policy"),
    (["train.engine=megatron"], "train.engine"),
])
def test_deepspeed_bad_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny_lm", overrides)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_deepspeed_checkpoint_never_executes_code(tmp_path, data_dir, env_ds, monkeypatch):
    """DeepSpeed reads its files with weights_only=False; a __reduce__ payload planted in one rank's
    optimizer file (manifest rewritten to match, as an attacker who can write files would) is refused
    by name on every rank and never runs; the genuine files of every ZeRO stage pass the same check."""
    import torch
    from longshard.parallel.deepspeed_engine import DeepSpeedLoadRefused, check_deepspeed_files_safe
    from longshard.train.checkpoint import STATE_FILE, file_manifest

    extra = [*DS, "deepspeed.zero_stage=2", "train.steps=2", "checkpoint.every=2"]
    out = tmp_path / "r"
    _run(2, out, data_dir, extra, env_ds)
    step = out / "checkpoints" / "step_00000002"
    check_deepspeed_files_safe(step / "deepspeed")  # genuine files: tensors, plain data, allowed records
    target = step / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload()}, target)
    state = json.loads((step / STATE_FILE).read_text())
    state["files"] = file_manifest(step)
    (step / STATE_FILE).write_text(json.dumps(state))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DeepSpeedLoadRefused, match=r"zero_pp_rank_1.*would import (posix|os)\.system"):
        check_deepspeed_files_safe(step / "deepspeed")
    (out / "report.json").unlink()
    proc = _run(2, out, data_dir, [*extra, "train.steps=3", "checkpoint.resume=auto"], env_ds, check=False)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "refusing to load" in log and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in log, log[-3000:]
    assert not list(tmp_path.rglob("PWNED_BY_CHECKPOINT")) and not (REPO / "PWNED_BY_CHECKPOINT").exists()
    # the load-time guard too: torch.load inside DeepSpeed's reader is weights_only=True
    from longshard.parallel.deepspeed_engine import weights_only_loading

    with pytest.raises(DeepSpeedLoadRefused, match="could run code"), weights_only_loading(str(step)):
        torch.load(target, weights_only=False)
    assert not list(tmp_path.rglob("PWNED_BY_CHECKPOINT"))
