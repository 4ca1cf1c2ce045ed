"""Errors raised for bad user input, before any real work starts."""

from __future__ import annotations


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
    """Raise :class:`ConfigError` unless ``value`` > 0."""
    require(value > 0, field, f"must be > 0, got {value!r}.", f"set {field} to a positive number.")
