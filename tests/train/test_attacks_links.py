"""Attacks through links and races on the folders a run writes: writability probes, the run lock
(its heartbeat, a simultaneous stale-lock takeover, malformed contents), the files a run writes and
``checkpoint.resume=none``'s set-aside."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from longshard.errors import ConfigError
from longshard.files import append_text, probe_writable, set_mode, write_file
from longshard.train.run_lock import RunLock, check_writable, set_aside_previous_run


def _victim(tmp_path: Path, text: str = "secret") -> Path:
    v = tmp_path / "victim.txt"
    v.write_text(text)
    v.chmod(0o600)
    return v


def test_writability_probes_never_follow_planted_links(tmp_path):
    """The old probe ``.write-test-<pid>`` was opened with truncation: links at every pid a run could
    get truncated the victim to 0 bytes. The probe name is random and created exclusively now."""
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for pid in range(os.getpid() - 50, os.getpid() + 50):
        (out / f".write-test-{pid}").symlink_to(victim)
    check_writable(out, "output_dir")
    probe_writable(out)
    assert victim.read_text() == "secret"
    assert len(list(out.iterdir())) == 100  # the planted links only: the probe left nothing behind


def test_write_file_replaces_a_link_and_never_writes_or_chmods_through_it(tmp_path):
    victim = _victim(tmp_path)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").symlink_to(victim)
    (folder / "dangling.json").symlink_to(tmp_path / "outside" / "new.json")
    write_file(folder / "config.json", "{}", mode=0o644)
    write_file(folder / "dangling.json", "{}")
    assert victim.read_text() == "secret" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not (tmp_path / "outside").exists()  # nothing was created outside the folder
    assert not (folder / "config.json").is_symlink() and (folder / "config.json").read_text() == "{}"
    assert stat.S_IMODE((folder / "config.json").stat().st_mode) == 0o644
    (folder / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        append_text(folder / "metrics.jsonl", "x\n")
    with pytest.raises(OSError):
        set_mode(folder / "metrics.jsonl", 0o644)
    assert victim.read_text() == "secret" and stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_the_lock_heartbeat_never_writes_through_a_link(tmp_path):
    victim = _victim(tmp_path)
    before = victim.stat().st_mtime_ns
    lock = RunLock(tmp_path / "run", heartbeat_s=0)
    lock.acquire()
    (tmp_path / "run" / ".lock").unlink()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    time.sleep(0.01)
    lock.heartbeat()
    assert victim.read_text() == "secret" and victim.stat().st_mtime_ns == before
    held = json.loads((tmp_path / "run" / ".lock").read_text())  # the link was replaced by our own lock
    assert held["pid"] == os.getpid() and not (tmp_path / "run" / ".lock").is_symlink()
    lock.release()
    assert victim.read_text() == "secret"


def test_a_lock_that_is_a_link_is_refused_by_name(tmp_path):
    victim = _victim(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        RunLock(tmp_path / "run").acquire()
    assert victim.read_text() == "secret"


@pytest.mark.parametrize("contents", ['{"pid": 1, "host": "n1", "started": "yesterday"}', '{"pid": 1, "host": "n1"}',
                                      "[1, 2, 3]", '{"pid": "x", "host": 5}', "[" * 100_000, "\x00\xff", ""])
def test_malformed_lock_contents_are_never_a_traceback(tmp_path, contents, caplog):
    """A fresh lock naming a holder on another host is a named refusal, whatever else it holds (that
    run may be alive: flock does not reach across nodes everywhere), and taken over once its heartbeat
    is old; contents naming nobody (no run writes those) are taken over with a warning saying so."""
    (tmp_path / ".lock").write_text(contents)
    lock = RunLock(tmp_path, stale_s=60)
    if '"host": "n1"' in contents:
        with pytest.raises(ConfigError, match=r"in use by another run \(pid 1 on n1, started at an unknown time"):
            lock.acquire()
        old = time.time() - 600
        os.utime(tmp_path / ".lock", (old, old))
    lock.acquire()
    assert lock.held
    if contents and '"host": "n1"' not in contents:
        assert "it names no holder" in caplog.text
    lock.release()


def _contender(path: str, go, done, results) -> None:  # a process racing for the lock
    lock = RunLock(path, stale_s=900)
    go.wait()
    try:
        lock.acquire()
        results.put(os.getpid())
    except ConfigError:
        results.put(0)
    done.wait()  # hold until every contender has tried
    lock.release()


def test_a_stale_lock_taken_by_six_processes_at_once_has_one_holder(tmp_path):
    """The old takeover (read, check, unlink, create) let two of six racing processes both hold the lock
    in 3 of 20 rounds. ``flock`` makes it one holder, every round."""
    ctx = mp.get_context("fork")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    for _ in range(20):
        (tmp_path / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": 1.0}))
        go, done, results = ctx.Barrier(6), ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(str(tmp_path), go, done, results)) for _ in range(6)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        holders = [g for g in got if g]
        assert len(holders) == 1, got
        assert not (tmp_path / ".lock").exists()  # the holder removed it on release


def test_set_aside_is_all_or_nothing(tmp_path, monkeypatch):
    """``checkpoint.resume=none`` moves the earlier run aside by renames only: a failing move (EXDEV, a
    full disk) puts back what was moved and names the file; a dangling link at the previous-<time>
    name is skipped, never followed."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "config.yaml").write_text("a: 1")
    (out / "metrics.jsonl").write_text("{}\n")
    stamp = time.strftime("previous-%Y%m%dT%H%M%SZ", time.gmtime())
    (out / stamp).symlink_to(tmp_path / "elsewhere")
    real_rename = os.rename

    def failing(src, dst):
        if "step_" in str(src):
            raise OSError(18, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(ConfigError, match="nothing was moved"):
        set_aside_previous_run(out, out / "checkpoints")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    monkeypatch.setattr(os, "rename", real_rename)
    dest = set_aside_previous_run(out, out / "checkpoints")
    assert dest.name != stamp and not (tmp_path / "elsewhere").exists()
    assert (dest / "config.yaml").read_text() == "a: 1" and (dest / "checkpoints" / "step_00000002").is_dir()


def test_export_overwrite_never_chmods_or_writes_through_links(tmp_path):
    """``export-hf --overwrite`` used to chmod every file of the folder 0644 following links (a 0600
    secret in the folder and a 0600 key outside it became world-readable) and a dangling
    ``config.json`` link made it create a file outside the folder."""
    from longshard.models import ModelConfig, Transformer
    from longshard.models.hf_export import export_hf

    key = _victim(tmp_path, "key")
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "notes.txt").chmod(0o600)
    (out / "id_rsa").symlink_to(key)
    (out / "config.json").symlink_to(tmp_path / "outside.json")
    (out / "model.safetensors.index.json").symlink_to(key)
    for pid in range(os.getpid() - 20, os.getpid() + 20):
        (out / f".write-test-{pid}").symlink_to(key)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, max_seq_len=32)
    export_hf(Transformer(cfg), out, overwrite=True, max_shard_bytes=4_000)  # sharded: an index is written
    assert key.read_text() == "key" and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "notes.txt").stat().st_mode) == 0o600
    assert not (tmp_path / "outside.json").exists()
    assert not (out / "config.json").is_symlink()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    mask = os.umask(0)
    os.umask(mask)
    for name in {*index["weight_map"].values(), "config.json"}:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
