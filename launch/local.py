"""Running the workers on this host for ``longshard train``: torchrun (through
:mod:`longshard.launch.agent`) in its own session, stop signals passed on to the workers, and the
ending explained (a SIGKILL no worker's own error accounts for is most often the out-of-memory killer).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("longshard")


# A worker's own error that makes torchrun stop (and SIGKILL) the others: then a SIGKILL is torchrun's, not the
# out-of-memory killer's. A collective error after a peer *died* (connection reset) does not count: that peer's
# SIGKILL is the cause. One that timed out (a peer hung) does.
_OWN_ERROR = re.compile(rb"(CheckpointError:|NonFiniteLossError:|invalid configuration:|OutOfMemory:|CollectiveError:"
                        rb"[^\n]*([Tt]imed out|pair closure|[Aa]pplication timeout))")


def sigkill_unexplained(stderr_tail: bytes) -> bool:
    """Whether torchrun's output reports a worker killed by SIGKILL that no worker's own error explains."""
    killed = any(m in stderr_tail for m in (b"exitcode  : -9", b"Signal 9 (SIGKILL)", b"killed by signal 9"))
    return killed and _OWN_ERROR.search(stderr_tail) is None


def children(pid: int) -> list[int]:
    """Process ids of ``pid``'s children (Linux /proc; empty elsewhere)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def run_forwarding_signals(cmd: list[str]) -> tuple[int, bool]:
    """Run ``cmd`` (:mod:`longshard.launch.agent`, torchrun) in its own session and pass SIGTERM / SIGINT /
    SIGHUP on as SIGTERM to its workers (torchrun's children; the one received is logged), so they
    checkpoint, stop and exit 0 and
    torchrun ends cleanly; torchrun itself gets SIGINT only when it has no workers (a terminal's Ctrl-C
    never reaches it directly). It also stops (SIGINT) if this process is killed. Returns its exit code
    and whether a worker was killed by SIGKILL with nothing else to explain it
    (:func:`sigkill_unexplained`; stderr is passed through)."""
    import signal
    import threading

    from longshard.train.faults import die_with_parent

    # the agent blocks SIGTERM (it ends with its workers): it is stopped by SIGINT if this process dies
    stop_agent = (lambda: die_with_parent(signal.SIGINT)) if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, preexec_fn=stop_agent, stderr=subprocess.PIPE, start_new_session=True)
    kept = bytearray()  # the last 4 MB of stderr, to explain the ending

    def relay() -> None:  # raw chunks as they come: a progress bar's carriage returns keep working
        out = getattr(sys.stderr, "buffer", None)
        while chunk := os.read(proc.stderr.fileno(), 65536):
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stderr.write(chunk.decode(errors="replace"))
            kept.extend(chunk)
            del kept[:-4 * 2**20]

    def forward(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        workers = children(proc.pid)
        log.warning("%s received: asking the workers to checkpoint and stop (as SIGTERM, which a starting worker "
                    "keeps until its handler is installed)", signal.Signals(signum).name)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not workers:  # none started yet (or all gone): stop the agent itself
            proc.send_signal(signal.SIGINT)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        rc = proc.wait()
        reader.join(timeout=10)
        return rc, sigkill_unexplained(bytes(kept))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
