"""Run-time facts about Triton shared by the Triton kernels (no Triton import at module load)."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    """Whether the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(x: torch.Tensor, what: str) -> None:
    """Raise a clear error when a Triton path is asked for but cannot run."""
    if not triton_installed():
        raise RuntimeError(f"{what} needs the `triton` package: pip install 'longshard[gpu]' (or triton>=3.0)")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(
            f"{what} runs on CUDA tensors (got {x.device}); on CPU set TRITON_INTERPRET=1 (slow, for tests) "
            "or use another path"
        )


def next_pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor) (tl.dot needs every dimension >= 16)."""
    p = floor
    while p < n:
        p *= 2
    return p
