"""Stop signals caught from a worker's first instant, before the heavy imports.

``python -m longshard.train.main`` installs these handlers before it imports torch (a second or more):
a SIGTERM or SIGINT that arrives meanwhile is recorded here, and :class:`~longshard.train.faults.
PreemptionWatch` takes it over when it is installed, so the run stops cleanly before its first step.
The launcher (:mod:`longshard.launch.agent`) *blocks* SIGTERM rather than ignoring it: its workers
inherit the mask, a SIGTERM sent while a worker's interpreter is still starting stays pending, and it
is delivered here the moment :func:`install` unblocks it (an ignored one would be lost).
This module imports nothing but the standard library.
"""

from __future__ import annotations

import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[tuple[str, float]] = []


def _record(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    _received.append((signal.Signals(signum).name, time.monotonic()))


def install() -> None:
    """Record SIGTERM / SIGINT from now on, and unblock them (a signal pending since start-up arrives now)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))


def received() -> list[tuple[str, float]]:
    """The signals recorded so far: (name, monotonic time), oldest first."""
    return list(_received)
