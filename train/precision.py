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
