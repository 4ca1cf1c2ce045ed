"""Errors raised for bad user input, before any real work starts, and the exit codes the
``longshard`` command and the training workers give for them."""

from __future__ import annotations

EXIT_INVALID_INPUT = 2  # ConfigError: a field, a flag or an input file is wrong (the message names it)
EXIT_CHECKPOINT = 3  # CheckpointError (or a non-finite loss in training): a checkpoint is refused or damaged
EXIT_COLLECTIVE = 4  # CollectiveError: a rank stopped answering (training only)
EXIT_OUT_OF_MEMORY = 5  # the allocator refused (host or device memory): the layout does not fit


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (the message names the file)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks the unpickler for code (a global, an opcode or a path outside the
    allow-list). Never skipped silently: resuming stops and names the file."""


class ConfigError(ValueError):
    """A configuration value is invalid.

    Args:
        field: dotted name of the offending field (e.g. ``train.seq_len``).
        problem: what is wrong with it.
        fix: how to fix it.
    """

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" Fix: {fix}"
        super().__init__(msg)


def require(cond: bool, field: str, problem: str, fix: str = "") -> None:
    """Raise :class:`ConfigError` unless ``cond`` holds."""
    if not cond:
        raise ConfigError(field, problem, fix)


def require_positive(value: int | float, field: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number > 0 (``inf`` and ``nan`` are refused)."""
    require(value > 0 and value != float("inf"), field, f"must be > 0 and finite, got {value!r}.",
            f"set {field} to a positive number.")
