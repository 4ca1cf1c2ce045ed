"""Evaluation: held-out loss and passkey-retrieval accuracy (teacher-forced exact match)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from longshard.models.model import IGNORE_INDEX, cross_entropy_sum
from longshard.parallel.sequence import SeqShard
from longshard.train.data.loader import PasskeyDataset, collate
from longshard.train.data.tokenizer import Tokenizer
from torch import nn


@torch.no_grad()
def heldout_loss(
    model: nn.Module, dataset, n_batches: int, batch_size: int, device: torch.device,
    autocast_dtype: torch.dtype | None, doc_mask: bool = True, sp: SeqShard | None = None,
) -> float | None:
    """Mean token loss over the first ``n_batches x batch_size`` held-out windows (None if empty)."""
    n = min(len(dataset), n_batches * batch_size)
    if n == 0:
        return None
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        b = collate([dataset[i] for i in range(start, min(start + batch_size, n))])
        logits, labels = forward_batch(model, b, device, autocast_dtype, doc_mask, sp)
        loss, cnt = cross_entropy_sum(logits, labels)
        sums = torch.stack([loss.detach().float(), cnt.float()])
        if sp is not None:
            dist.all_reduce(sums, group=sp.group)
        total += float(sums[0])
        count += int(sums[1])
    return total / max(count, 1)


def forward_batch(model, batch, device, autocast_dtype, doc_mask: bool, sp: SeqShard | None = None):
    """Logits and labels of this rank for a collated batch.

    With ``sp`` the batch is first cut to this rank's sequence shard; a batch that already is a
    shard carries its ``position_ids``. Used by training and evaluation alike.
    """
    if sp is not None:
        batch = sp.shard(batch["tokens"], batch["labels"], batch["doc_ids"] if doc_mask else None)
    to = lambda t: None if t is None else t.to(device)
    doc = batch["doc_ids"] if doc_mask else None
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(to(batch["tokens"]), doc_ids_BS=to(doc), position_ids_BS=to(batch.get("position_ids")))
    return logits, to(batch["labels"])


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module, tokenizer: Tokenizer, length: int, n_samples: int, device: torch.device,
    autocast_dtype: torch.dtype | None, seed: int = 1234, sp: SeqShard | None = None,
) -> float:
    """Share of prompts whose every answer token is the argmax prediction (= greedy exact match)."""
    ds = PasskeyDataset(tokenizer, length, n_samples, seed)
    correct = 0
    for i in range(n_samples):
        logits, labels = forward_batch(model, collate([ds[i]]), device, autocast_dtype, False, sp)
        sel = labels != IGNORE_INDEX
        wrong = (logits.argmax(-1)[sel] != labels[sel]).sum().reshape(1).float()
        if sp is not None:  # the answer may straddle sequence shards
            dist.all_reduce(wrong, group=sp.group)
        correct += int(wrong.item() == 0)
    return correct / max(n_samples, 1)


def evaluate(
    model: nn.Module, *, val_dataset, tokenizer: Tokenizer, seq_len: int, val_batches: int, batch_size: int,
    passkey_lengths: list[int], passkey_samples: int, device: torch.device, autocast_dtype: torch.dtype | None,
    doc_mask: bool = True, sp: SeqShard | None = None,
) -> dict[str, Any]:
    """Run every evaluation and return flat metrics (``val_loss``, ``val_ppl``, ``passkey_acc@N``).

    Every rank runs the same evaluation (the model may be sharded, so all must take part).
    """
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    if val_dataset is not None and val_batches > 0:
        loss = heldout_loss(model, val_dataset, val_batches, batch_size, device, autocast_dtype, doc_mask, sp)
        if loss is not None:
            out["val_loss"] = loss
            out["val_ppl"] = math.exp(min(loss, 50.0))
    if passkey_samples > 0:
        for n in passkey_lengths or [seq_len, 2 * seq_len]:
            out[f"passkey_acc@{n}"] = passkey_accuracy(model, tokenizer, n, passkey_samples, device, autocast_dtype,
                                                       sp=sp)
    model.train(was_training)
    return out
