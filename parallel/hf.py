"""Sequence parallelism for a transformers causal LM: our Ulysses, ring (zigzag), hybrid and
sparsity-aware exchange around each layer's longshard attention.

::

    from longshard.parallel.hf import sequence_parallel, shard_inputs

    model.set_attn_implementation("longshard")              # or load with it
    shard = sequence_parallel(model, sp_group, mode="ring")  # once, before DDP / FSDP2
    batch = shard_inputs(shard, input_ids, doc_ids=doc_ids, loss_group=world_group)
    loss = model(**batch).loss                               # this rank's share of the global mean
    loss.backward()                                          # DDP / FSDP2 average over the ranks as usual

Each layer's core attention (the one :mod:`longshard.models.hf_attention` runs, or the one
:mod:`longshard.models.hf_swap` attached with its parameters) is wrapped by the functions our own
``parallelize`` applies (:func:`~longshard.parallel.ulysses.apply_ulysses`,
:func:`~longshard.parallel.ring.apply_ring`, over the decoder layers' attention views of
:func:`longshard.models.hf_causal.decoder_layers`): dense layers run ring attention, block-sparse ones the
sparsity-aware exchange, under ``ring`` and ``hybrid``. :func:`shard_inputs` shards a batch like our
trainer does (positions computed on the whole sequence first, labels shifted before sharding so no
target crosses a shard, a document's last token predicting nothing) and sets ``num_items_in_batch``
so that each rank's loss is its token sum times the ranks over the global token count: the mean
over ranks (what DDP and FSDP2 average gradients over) is the global token mean, as in our trainer.
Padding masks are not supported under sequence parallelism (pack documents instead).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from longshard.errors import ConfigError
from longshard.models import hf_attention, hf_causal
from longshard.parallel.layout import CommCounter, SeqShard, shard_batch
from longshard.parallel.ring import apply_ring
from longshard.parallel.ulysses import apply_ulysses

IGNORE_INDEX = -100
SP_MODES = ("ulysses", "ring", "hybrid")
_SHARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its HFShard


@dataclass(frozen=True)
class HFShard:
    """This rank's place in the sequence-parallel layout of a transformers model.

    Args:
        seq: the shard layout (:class:`SeqShard`: rank, degree, zigzag, inner Ulysses degree).
        groups: the process groups whose product is the whole sequence group (ring and Ulysses in hybrid).
    """

    seq: SeqShard
    groups: tuple[dist.ProcessGroup, ...]


def sequence_parallel(model: torch.nn.Module, group: dist.ProcessGroup, mode: str = "ulysses",
                      ulysses_group: dist.ProcessGroup | None = None,
                      counter: CommCounter | None = None) -> HFShard:
    """Make every attention layer of the transformers causal LM ``model`` sequence-parallel (in place).

    Args:
        model: a transformers causal LM; its attention implementation is set to ``longshard``.
        group: ``ulysses``/``ring``: the sequence-parallel group; ``hybrid``: the ring group.
        mode: ``ulysses`` (all-to-all, head shards), ``ring`` (zigzag shards; dense layers rotate K/V,
            block-sparse ones exchange only the blocks they read) or ``hybrid`` (Ulysses inside
            ``ulysses_group`` around a ring over ``group``).
        ulysses_group: the inner Ulysses group of ``hybrid``.
        counter: optional communication counter.

    Returns:
        This rank's :class:`HFShard` (pass it to :func:`shard_inputs`).
    """
    if mode not in SP_MODES:
        raise ConfigError("mode", f"unknown sequence-parallel mode {mode!r}.", f"use one of {', '.join(SP_MODES)}.")
    if (mode == "hybrid") != (ulysses_group is not None):
        raise ConfigError("ulysses_group", "is needed by mode=hybrid and only by it.", "pass it with hybrid only.")
    model.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION)
    layers = SimpleNamespace(layers=hf_causal.decoder_layers(model))  # what apply_ulysses / apply_ring read
    try:
        if mode == "ulysses":
            apply_ulysses(layers, group, counter)
        else:
            apply_ring(layers, group, counter, ulysses_group=ulysses_group)
    except ConfigError as e:
        raise ConfigError("mode", f"{mode}: {e.problem}", e.fix) from None
    except NotImplementedError as e:  # hybrid: a variant that cannot run on a slice of its heads
        raise ConfigError("mode", f"{mode}: {e}.", "use another mode or variant.") from None
    degree = dist.get_world_size(group) * (dist.get_world_size(ulysses_group) if ulysses_group is not None else 1)
    inner = dist.get_world_size(ulysses_group) if ulysses_group is not None else 1
    rank = dist.get_rank(group) * inner + (dist.get_rank(ulysses_group) if ulysses_group is not None else 0)
    shard = HFShard(SeqShard(group=group, rank=rank, degree=degree, zigzag=mode != "ulysses", inner=inner),
                    (group,) if ulysses_group is None else (group, ulysses_group))
    _SHARDS[model] = shard
    return shard


def shard_inputs(shard: HFShard, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 doc_ids: torch.Tensor | None = None, loss_group: dist.ProcessGroup | None = None,
                 step_tokens: torch.Tensor | float | None = None) -> dict[str, torch.Tensor | bool]:
    """This rank's part of a batch, as keyword arguments of the model's forward.

    Args:
        shard: what :func:`sequence_parallel` returned.
        input_ids: (B, S) the whole sequences (every rank of the sequence group passes the same).
        labels: (B, S) targets aligned with ``input_ids`` as transformers takes them (shifted here);
            default ``input_ids``. ``-100`` = no loss.
        doc_ids: (B, S) document index of each token of packed sequences; positions restart per
            document, no token attends to another document and a document's last token predicts
            nothing.
        loss_group: the ranks whose gradients are averaged (DDP / FSDP2: usually the whole world);
            default the sequence group (ring x Ulysses in hybrid). The global count of target tokens
            over it sets ``num_items_in_batch``.
        step_tokens: with gradient accumulation, the target tokens of the whole optimizer step (every
            micro-batch, every data-parallel rank, each sequence counted once) instead of this
            micro-batch's: each micro-batch's loss is then its share of the step's token mean and the
            accumulated gradients are those of the whole step (no division by the accumulation steps).

    Returns:
        ``input_ids``, ``position_ids``, ``labels`` and ``shift_labels`` (already shifted),
        ``num_items_in_batch``, ``longshard_doc_ids`` and ``use_cache=False``.
    """
    labels = input_ids if labels is None else labels
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if doc_ids is not None:  # a document's last token does not predict the next document's first
        shifted[:, :-1] = shifted[:, :-1].masked_fill(doc_ids[:, 1:] != doc_ids[:, :-1], IGNORE_INDEX)
    seq = shard.seq
    part = shard_batch(input_ids, shifted, doc_ids, seq.rank, seq.degree, seq.zigzag, seq.inner)
    groups = (loss_group,) if loss_group is not None else shard.groups
    count = (part["labels"] != IGNORE_INDEX).sum().to(torch.float32)
    ranks = 1
    for group in groups:  # hybrid: over the ring, then over Ulysses = over the whole grid
        if step_tokens is None:
            dist.all_reduce(count, group=group)
        ranks *= dist.get_world_size(group)
    if step_tokens is not None:
        count = torch.as_tensor(step_tokens, dtype=torch.float32, device=count.device)
    labels_local = part["labels"].contiguous()
    return {"input_ids": part["tokens"].contiguous(), "position_ids": part["position_ids"].to(input_ids.device),
            "labels": labels_local, "shift_labels": labels_local,
            "num_items_in_batch": (count / ranks).clamp_min(1.0 / ranks),
            "longshard_doc_ids": part["doc_ids"], "use_cache": False}


def is_sequence_parallel(model: torch.nn.Module) -> bool:
    """Whether :func:`sequence_parallel` was applied to ``model``."""
    return model in _SHARDS
