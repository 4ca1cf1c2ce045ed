"""The run's compute dtype, decided in one place: ``train.dtype`` -> the autocast dtype of the
forward and backward, and the bytes of one activation element. The trainer, ``longshard eval``, the
planner and the traffic report all read it here."""

from __future__ import annotations

import torch

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(train_dtype: str) -> torch.dtype | None:
    """The autocast dtype of ``train.dtype`` (None: fp32 throughout; weights stay fp32 in every case)."""
    return AUTOCAST[train_dtype]


def activation_bytes(train_dtype: str) -> int:
    """Bytes of one activation element under ``train.dtype`` (2 for bf16 and fp16, 4 for fp32)."""
    return torch.empty((), dtype=compute_dtype(train_dtype) or torch.float32).element_size()


def cpu_bf16_slowdown(n: int = 256, reps: int = 5) -> float:
    """How many times slower a bf16 matmul under autocast is than the same fp32 matmul on this CPU
    (best of ``reps``; a few milliseconds). CPUs without bf16 instructions (no AVX512_BF16 / AMX)
    emulate it and are many times slower."""
    import time

    a, b = torch.randn(n, n), torch.randn(n, n)

    def best(dtype: torch.dtype | None) -> float:
        times = []
        for _ in range(reps + 1):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                start = time.perf_counter()
                (a @ b).sum()
                times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(torch.bfloat16) / max(best(None), 1e-9)


def warn_if_slow_cpu_bf16(train_dtype: str, device_type: str, slowdown=cpu_bf16_slowdown,
                          threshold: float = 2.0) -> float | None:
    """On a CPU run with ``train.dtype=bf16``, measure :func:`cpu_bf16_slowdown` and warn when bf16 is
    more than ``threshold`` times slower than fp32 here. Returns the measured ratio (None: not a CPU
    bf16 run)."""
    import logging

    if device_type != "cpu" or train_dtype != "bf16":
        return None
    ratio = slowdown()
    if ratio > threshold:
        logging.getLogger(__name__).warning(
            "train.dtype=bf16 on this CPU: a bf16 matmul measured %.1fx slower than fp32 here (no bf16 "
            "instructions: AVX512_BF16 or AMX), so training will be several times slower than in fp32. Use "
            "train.dtype=fp32 on this machine (bf16 is for GPUs and bf16-capable CPUs).", ratio)
    return ratio
