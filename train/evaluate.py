"""Evaluation: held-out loss and passkey-retrieval accuracy (teacher-forced exact match)."""

from __future__ import annotations

import math
from typing import Any

import torch
from longshard.models.model import IGNORE_INDEX, cross_entropy_sum
from longshard.train.data.loader import PasskeyDataset, collate
from longshard.train.data.tokenizer import Tokenizer
from torch import nn


@torch.no_grad()
def heldout_loss(
    model: nn.Module, dataset, n_batches: int, batch_size: int, device: torch.device,
    autocast_dtype: torch.dtype | None, doc_mask: bool = True,
) -> float | None:
    """Mean token loss over the first ``n_batches x batch_size`` held-out windows (None if empty)."""
    n = min(len(dataset), n_batches * batch_size)
    if n == 0:
        return None
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        b = collate([dataset[i] for i in range(start, min(start + batch_size, n))])
        loss, cnt = _forward_loss(model, b, device, autocast_dtype, doc_mask)
        total += float(loss)
        count += int(cnt)
    return total / max(count, 1)


def _forward_loss(model, batch, device, autocast_dtype, doc_mask):
    tokens = batch["tokens"].to(device)
    doc = batch["doc_ids"].to(device) if (doc_mask and batch["doc_ids"] is not None) else None
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(tokens, doc_ids_BS=doc)
    return cross_entropy_sum(logits, batch["labels"].to(device))


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module, tokenizer: Tokenizer, length: int, n_samples: int, device: torch.device,
    autocast_dtype: torch.dtype | None, seed: int = 1234,
) -> float:
    """Share of prompts whose every answer token is the argmax prediction (= greedy exact match)."""
    ds = PasskeyDataset(tokenizer, length, n_samples, seed)
    correct = 0
    for i in range(n_samples):
        b = collate([ds[i]])
        tokens, labels = b["tokens"].to(device), b["labels"].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(tokens)
        sel = labels != IGNORE_INDEX
        correct += int(bool((logits.argmax(-1)[sel] == labels[sel]).all()))
    return correct / max(n_samples, 1)


def evaluate(
    model: nn.Module, *, val_dataset, tokenizer: Tokenizer, seq_len: int, val_batches: int, batch_size: int,
    passkey_lengths: list[int], passkey_samples: int, device: torch.device, autocast_dtype: torch.dtype | None,
    doc_mask: bool = True,
) -> dict[str, Any]:
    """Run every evaluation and return flat metrics (``val_loss``, ``val_ppl``, ``passkey_acc@N``).

    Every rank runs the same evaluation (the model may be sharded, so all must take part).
    """
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    if val_dataset is not None and val_batches > 0:
        loss = heldout_loss(model, val_dataset, val_batches, batch_size, device, autocast_dtype, doc_mask)
        if loss is not None:
            out["val_loss"] = loss
            out["val_ppl"] = math.exp(min(loss, 50.0))
    if passkey_samples > 0:
        for n in passkey_lengths or [seq_len, 2 * seq_len]:
            out[f"passkey_acc@{n}"] = passkey_accuracy(model, tokenizer, n, passkey_samples, device, autocast_dtype)
    model.train(was_training)
    return out
