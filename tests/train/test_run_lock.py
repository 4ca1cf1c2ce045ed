"""One run per output directory: a second run into a locked output_dir stops at once; stale locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from train_runs import _run

pytestmark = pytest.mark.dist


def test_second_run_into_a_locked_output_dir_stops_at_once(tmp_path, data_dir, env_cpu):
    """A live holder (this test process) keeps the directory: both ranks stop at once (exit 2) naming it
    and nothing is written; a lock of a dead process on this host is taken over; the lock is gone after a run."""
    import socket

    out = tmp_path / "r"
    out.mkdir()
    lock = out / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    proc = _run(2, out, data_dir, ["train.steps=2"], env_cpu, check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]  # each worker exits 2 (torchrun reports 1)
    assert "invalid configuration: output_dir:" in proc.stderr and "Traceback (most recent call last):\n  File" \
        not in proc.stderr.split("invalid configuration")[0]
    assert f"in use by another run (pid {os.getpid()} on {socket.gethostname()}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}))
    proc = _run(1, out, data_dir, ["train.steps=2"], env_cpu)
    assert "taking over the stale lock" in proc.stderr and not lock.exists()


def test_run_lock_staleness(tmp_path):
    from longshard.errors import ConfigError
    from longshard.train.run_lock import RunLock

    a, b = RunLock(tmp_path, stale_s=60), RunLock(tmp_path, stale_s=60)
    a.acquire()
    with pytest.raises(ConfigError, match="in use by another run"):
        b.acquire()
    a.release()  # what flock cannot see: a holder on another node (node-local locks), named by the contents
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "another-node", "started": 0}))
    with pytest.raises(ConfigError, match="another-node"):  # fresh heartbeat on another host: alive
        b.acquire()
    os.utime(tmp_path / ".lock", (time.time() - 120, time.time() - 120))  # its node died two minutes ago
    b.acquire()
    assert b.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    b.release()
    assert not (tmp_path / ".lock").exists()

