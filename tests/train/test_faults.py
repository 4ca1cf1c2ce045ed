"""Fault-handling building blocks: pre-emption flag, drill spec parsing, collective error detection."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from longshard.train.faults import PreemptionWatch, collective_failure, is_collective_error, parse_fault


def test_parse_fault_spec():
    assert parse_fault("kill:rank=1:step=4") == ("kill", 1, 4, "step")
    assert parse_fault("hang:step=2:rank=0") == ("hang", 0, 2, "step")
    assert parse_fault("hang:rank=1:step=2:at=save") == ("hang", 1, 2, "save")
    for bad in ("explode:rank=1:step=2", "kill:rank=1", "kill:rank=1:step=2:when=now"):
        with pytest.raises(ValueError, match="LONGSHARD_INJECT_FAULT"):
            parse_fault(bad)


def test_collective_errors_are_recognised_and_named():
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    assert is_collective_error(gloo)
    assert not is_collective_error(ValueError("shape mismatch"))
    assert not is_collective_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    err = collective_failure(gloo, rank=3, step=17, phase="training step", timeout_s=30)
    assert "rank 3" in str(err) and "step 17" in str(err) and "collective_timeout_s=30" in str(err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_flag_a_duplicate_is_tolerated_and_a_later_repeat_terminates(sig):
    """SIGTERM and SIGINT alike: the first sets the flag; the same request delivered again at once (Slurm
    and torchrun both signal a worker) is tolerated, and so is any repeat while a checkpoint is written;
    a repeat after the window terminates."""
    code = (
        "import os, signal, time\n"
        "from longshard.train.faults import PreemptionWatch\n"
        "w = PreemptionWatch(repeat_window_s=1.0)\n"
        f"os.kill(os.getpid(), {int(sig)})\n"
        "time.sleep(0.1)\n"
        "print('flag', w.requested, w.signal_name, flush=True)\n"
        f"os.kill(os.getpid(), {int(sig)})\n"
        "time.sleep(0.1)\n"
        "print('duplicate tolerated', flush=True)\n"
        "time.sleep(1.2)\n"
        "with w.saving():\n"
        f"    os.kill(os.getpid(), {int(sig)})\n"
        "    time.sleep(0.1)\n"
        "    print('save not interrupted', flush=True)\n"
        f"os.kill(os.getpid(), {int(sig)})\n"
        "time.sleep(5)\n"
        "print('survived', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert f"flag True {signal.Signals(sig).name}" in proc.stdout
    assert "duplicate tolerated" in proc.stdout and "save not interrupted" in proc.stdout
    assert "survived" not in proc.stdout
    assert proc.returncode == -sig


def test_restore_puts_back_the_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    w = PreemptionWatch()
    assert signal.getsignal(signal.SIGTERM) != before
    w.restore()
    assert signal.getsignal(signal.SIGTERM) == before


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_checkpoint_metadata_never_executes_code(tmp_path, monkeypatch):
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp
    from longshard.train.checkpoint import CheckpointError, check_metadata_safe

    good = tmp_path / "good"
    dcp.save({"w": torch.randn(3, 2), "n": 3}, checkpoint_id=str(good))  # a genuine DCP metadata file
    check_metadata_safe(good)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".metadata").write_bytes(pickle.dumps(_Payload()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"\.metadata.*refusing to load global (posix|os)\.system"):
        check_metadata_safe(bad)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_checkpoint_entries_never_execute_code(tmp_path, monkeypatch):
    """A pickled __reduce__ payload stored as a DCP bytes entry (where optimizer param_groups live)
    runs under DCP's default planner; our planner refuses it with a named error, and still loads the
    plain entries of a genuine checkpoint (param_groups: lists, floats, tuples)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from longshard.train.checkpoint import CheckpointError, SafeLoadPlanner

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad"
    dcp.save({"w": torch.ones(2), "param_groups": _Payload()}, checkpoint_id=str(bad))
    from torch.distributed.checkpoint.api import CheckpointException

    # DCP wraps the planner's error into its own CheckpointException (the Checkpointer turns that
    # into a CheckpointError naming the folder and falls back)
    with pytest.raises((CheckpointError, CheckpointException), match="'param_groups' is not plain data"):
        dcp.load({"w": torch.zeros(2), "param_groups": None}, checkpoint_id=str(bad), planner=SafeLoadPlanner())
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    good = tmp_path / "good"
    groups = [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1], "foreach": None}]
    dcp.save({"w": torch.arange(2.0), "param_groups": groups}, checkpoint_id=str(good))
    state = {"w": torch.zeros(2), "param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": [9, 9], "foreach": 1}]}
    dcp.load(state, checkpoint_id=str(good), planner=SafeLoadPlanner())
    assert state["param_groups"] == groups and torch.equal(state["w"], torch.arange(2.0))
    dcp.load({"w": torch.zeros(2), "param_groups": None}, checkpoint_id=str(bad))  # the default planner runs it
    assert (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_full_disk_for_metrics_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    """metrics.jsonl on a full disk: a warning naming the file and the fix, once; the run is not stopped
    (rank 0 raising there would leave the other ranks waiting in their next collective)."""
    import errno
    import logging

    from longshard.train.metrics import MetricsLogger

    m = MetricsLogger(tmp_path, enabled=True, total_steps=3, start_step=0, wandb_mode="disabled", project="p",
                      run_name="r", group="g", config={}, progress=False)
    m.log(1, {"loss": 1.0})
    from longshard.train import metrics as metrics_module

    real_append = metrics_module.append_text

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_module, "append_text", full)
    with caplog.at_level(logging.WARNING, logger="longshard.train.metrics"):
        m.log(2, {"loss": 0.5})
        m.log(3, {"loss": 0.25})
    warnings = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0] and "output_dir" in warnings[0]
    assert m.lost_records == 2
    monkeypatch.setattr(metrics_module, "append_text", real_append)
    m.log(4, {"loss": 0.125})  # space again: records are appended again
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 4]
    m.close()


@pytest.mark.dist
def test_a_rank_stalled_in_a_checkpoint_save_is_named_and_not_blamed_on_memory(tmp_path):
    """Rank 1 hangs as step 2's checkpoint save starts: rank 0's save collective times out with a
    CollectiveError naming the phase; torchrun then SIGKILLs the hung rank, which the launcher does not
    report as the out-of-memory killer."""
    import os
    import re
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled",
               LONGSHARD_INJECT_FAULT="hang:rank=1:step=2:at=save")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "longshard.cli", "train", "tiny_lm", "train.steps=3", "checkpoint.every=2",
         "model.n_layers=1", "train.seq_len=64", "train.global_batch_size=8", "data.default_corpus_bytes=100000",
         "eval.passkey_samples=0", "logging.wandb=disabled", "logging.progress=false",
         "parallel.collective_timeout_s=5", f"output_dir={tmp_path / 'run'}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 240
    assert re.search(r"CollectiveError: rank 0: a collective failed during the checkpoint save of step 2 ",
                     proc.stderr), proc.stderr[-4000:]
    assert "out-of-memory" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "step_00000002").exists()
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))  # rank 0 removed its unfinished folder
    # the worker named its error: the launcher ends with one line, not torchrun's traceback
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"longshard: workers ended \(rank 0 code 4, rank 1 (killed by signal 9 \(SIGKILL\)|code 0)\)",
                     proc.stderr), proc.stderr[-2000:]


def test_pair_closure_is_a_collective_error_and_allocator_refusals_are_out_of_memory():
    import torch
    from longshard.train.faults import is_out_of_memory

    closure = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Application timeout caused pair "
                           "closure")
    assert is_collective_error(closure) and not is_out_of_memory(closure)
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as e:
        refused = e
    assert is_out_of_memory(refused) and not is_collective_error(refused)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_sequence_that_does_not_fit_is_named_with_its_fixes(tmp_path, monkeypatch, caplog):
    """After the planner's warning the allocator's RuntimeError used to end the run as a traceback."""
    import torch
    from attack_helpers import SMALL_RUN
    from longshard.cli import main
    from longshard.errors import EXIT_OUT_OF_MEMORY
    from longshard.train import loop

    real = loop.forward_loss

    def huge(*args, **kwargs):  # the activations of a sequence far too long for this host
        torch.empty(2**62, dtype=torch.uint8)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_loss", huge)
    rc = main(["train", *SMALL_RUN, "train.steps=2", f"output_dir={tmp_path / 'r'}"])
    assert rc == EXIT_OUT_OF_MEMORY
    assert "OutOfMemory: rank 0 ran out of memory" in caplog.text and "longshard plan" in caplog.text


def test_which_sigkill_gets_the_out_of_memory_explanation():
    """A peer killed first (the others see a reset connection) is explained as memory; a worker torchrun
    kills after another's own error (a timeout of a hung peer, a refused checkpoint) is not."""
    from longshard.launch.local import sigkill_unexplained as _sigkill_unexplained

    summary = b"[1]:\n  exitcode  : -9 (pid: 17587)  (SIGKILL)\n  traceback : Signal 9 (SIGKILL) received by PID 1\n"
    reset = b"[rank0] ERROR longshard: CollectiveError: rank 0: ... Connection reset by peer. ...\n"
    timeout = b"[rank0] ERROR longshard: CollectiveError: rank 0: ... (Timed out waiting 5000ms for recv)\n"
    assert _sigkill_unexplained(summary)
    assert _sigkill_unexplained(reset + summary)
    assert not _sigkill_unexplained(timeout + summary)
    closure = (b"[rank0] ERROR longshard: CollectiveError: rank 0: a collective failed during the checkpoint save of "
               b"step 2 ([../third_party/gloo/gloo/transport/tcp/pair.cc:534] Application timeout caused pair "
               b"closure). ...\n")
    assert not _sigkill_unexplained(closure + summary)  # a SIGSTOPped peer past the timeout: not memory
    assert not _sigkill_unexplained(b"[rank0] ERROR longshard: OutOfMemory: rank 0 ran out of memory\n" + summary)
    assert not _sigkill_unexplained(b"[rank1] ERROR longshard: CheckpointError: x\n" + summary)
    assert not _sigkill_unexplained(reset)  # no SIGKILL at all


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_to_longshard_train_checkpoints_and_exits_cleanly(tmp_path, sig):
    """SIGINT (Ctrl-C) behaves as SIGTERM: `longshard train` passes it to its workers only, every rank
    writes the pre-emption checkpoint and the report, and the command exits 0 without a torchrun
    traceback (torchrun runs in its own session, so a terminal's Ctrl-C reaches only the launcher)."""
    import os
    import time

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    proc = subprocess.Popen(
        [sys.executable, "-m", "longshard.cli", "train", "tiny_lm", "train.steps=400", "checkpoint.every=1000",
         "model.n_layers=1", "train.seq_len=64", "train.global_batch_size=8", "data.default_corpus_bytes=100000",
         "eval.passkey_samples=0", "eval.val_batches=1", "logging.wandb=disabled", f"output_dir={out}"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():  # training has started
        time.sleep(0.2)
    assert (out / "metrics.jsonl").exists()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    step = report["preempted_at_step"]
    assert step is not None and 0 < step < 400
    assert (out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").is_file()
