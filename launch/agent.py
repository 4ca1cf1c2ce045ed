"""torchrun for longshard: ``python -m longshard.launch.agent [torchrun args]`` (``longshard train`` and
the Slurm template run it).

A worker that stops with a named error exits with its code; plain torchrun then raises a 40-line
ChildFailedError traceback. Here the agent ends with one line and the first failed worker's code.

Slurm delivers a pre-emption or ``scancel`` signal to every process of a job step: the torchrun agent
as well as its workers. Plain torchrun answers SIGTERM by stopping its workers and killing any still
running after 30 s, then exits with an error, so a checkpoint that takes longer is lost and the step
is recorded as failed. Here the agent blocks SIGTERM (its workers keep their own handler: they finish
the micro-batch, write the checkpoint and exit 0), and torchrun then ends normally with them. Blocked,
not ignored: the workers inherit the mask, so a SIGTERM that reaches a worker before it installed its
handler stays pending and is delivered when it does (:mod:`longshard.train.early_signals`), where an
inherited "ignore" lost it. SIGINT, SIGHUP and SIGQUIT still stop the agent as usual.
"""

from __future__ import annotations

import os
import signal
import sys

HANDLED = "SIGINT,SIGHUP,SIGQUIT"  # what the agent still stops on (torchrun's default list less SIGTERM)


def main(argv: list[str] | None = None) -> None:
    """Run torchrun with ``argv`` (default: this process's arguments), SIGTERM blocked in the agent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a TERM already pending is dropped, then the mask holds
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what the workers inherit: blocked, default action
    # torchrun installs its stopping handler for the signals of --signals-to-handle (read from this
    # variable as its default); without SIGTERM there, the ignore above stays in force
    os.environ["PET_SIGNALS_TO_HANDLE"] = HANDLED
    from torch.distributed.launcher.api import LaunchConfig

    if not hasattr(LaunchConfig, "signals_to_handle"):  # an older torchrun handles SIGTERM unconditionally
        import torch.distributed.elastic.multiprocessing.api as pcontext

        stop = pcontext._terminate_process_handler

        def handler(signum, frame) -> None:
            if signum != signal.SIGTERM:
                stop(signum, frame)

        pcontext._terminate_process_handler = handler
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    sys.argv = ["torchrun", *(sys.argv[1:] if argv is None else argv)]
    try:
        torchrun_main()
    except ChildFailedError as e:  # the worker already named its error: its exit code, no 40-line traceback
        _, first = e.get_first_failure()
        ended = ", ".join(f"rank {rank} " + (f"code {f.exitcode}" if f.exitcode >= 0 else
                                              f"killed by signal {-f.exitcode} ({signal.Signals(-f.exitcode).name})")
                          for rank, f in sorted(e.failures.items()))
        sys.stderr.write(f"longshard: workers ended ({ended}); their own messages are above.\n")
        sys.exit(first.exitcode if first.exitcode > 0 else 128 - first.exitcode)


if __name__ == "__main__":
    main()
