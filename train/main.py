"""Entry point run by torchrun / deepspeed / srun: ``python -m longshard.train.main RECIPE [key=value ...]``."""

from __future__ import annotations

from longshard.train import early_signals

early_signals.install()  # before the heavy imports below: a stop signal during start-up is kept, not lost

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

from longshard.errors import (  # noqa: E402
    EXIT_CHECKPOINT,
    EXIT_COLLECTIVE,
    EXIT_INVALID_INPUT,
    EXIT_OUT_OF_MEMORY,
    ConfigError,
)
from longshard.parallel import destroy_distributed, exit_worker  # noqa: E402
from longshard.train.config import load_config  # noqa: E402
from longshard.train.faults import (  # noqa: E402
    PreemptionWatch,
    die_with_parent,
    is_out_of_memory,
    out_of_memory_message,
)
from longshard.train.metrics import human_summary  # noqa: E402
from longshard.train.trainer import CheckpointError, CollectiveError, NonFiniteLossError, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longshard.train.main", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML path or shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    watch = PreemptionWatch()  # from here on a SIGTERM stops the run cleanly (before any step if it comes now)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: never outlive the launcher
        die_with_parent()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        logging.getLogger("longshard").error("invalid configuration: %s", e)
        return EXIT_INVALID_INPUT
    try:
        report = train(cfg, watch)
    except ConfigError as e:
        logging.getLogger("longshard").error("invalid configuration: %s", e)
        return EXIT_INVALID_INPUT
    except (NonFiniteLossError, CheckpointError) as e:
        logging.getLogger("longshard").error("%s: %s", type(e).__name__, e)
        return EXIT_CHECKPOINT
    except CollectiveError as e:
        logging.getLogger("longshard").error("CollectiveError: %s", e)
        return EXIT_COLLECTIVE
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        logging.getLogger("longshard").error("OutOfMemory: %s", out_of_memory_message(e, rank))
        return EXIT_OUT_OF_MEMORY
    finally:
        watch.restore()
        destroy_distributed()
    if rank == 0:
        logging.getLogger("longshard").info("%s", human_summary(report))
    return 0


if __name__ == "__main__":
    exit_worker(main())
