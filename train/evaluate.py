"""Evaluation: held-out loss, perplexity vs context length, passkey retrieval over lengths x depths, MQAR."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from longshard.models.model import IGNORE_INDEX, LossOutput
from longshard.parallel.data_parallel import unwrap
from longshard.parallel.layout import SeqShard
from longshard.train.config import Config
from longshard.train.data.loader import MQARDataset, PasskeyDataset, Sample, TokenWindows, collate
from longshard.train.data.synthetic import mqar_distances, passkey_sample
from longshard.train.data.tokenizer import Tokenizer
from longshard.train.precision import compute_dtype
from longshard.train.resolve import passkey_lengths
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
        out = forward_loss(model, b, device, autocast_dtype, doc_mask, sp)
        sums = torch.stack([out.loss_sum.detach().float(), out.n_tokens.float()])
        if sp is not None:
            dist.all_reduce(sums, group=sp.group)
        total += float(sums[0])
        count += int(sums[1])
    return total / max(count, 1)


def forward_loss(model, batch, device, autocast_dtype, doc_mask: bool, sp: SeqShard | None = None,
                 want_correct: bool = False) -> LossOutput:
    """The loss head's output (summed loss, token count, optionally argmax hits) of this rank for a batch.

    With ``sp`` the batch is first cut to this rank's sequence shard; a batch that already is a
    shard carries its ``position_ids``. Used by training and evaluation alike; the logits are
    computed chunk by chunk inside the model and never held for all tokens.
    """
    if sp is not None:
        batch = sp.shard(batch["tokens"], batch["labels"], batch["doc_ids"] if doc_mask else None)
    to = lambda t: None if t is None else t.to(device)
    doc = batch["doc_ids"] if doc_mask else None
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return model(to(batch["tokens"]), doc_ids_BS=to(doc), position_ids_BS=to(batch.get("position_ids")),
                     labels_BS=to(batch["labels"]), want_correct=want_correct)


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module, tokenizer: Tokenizer, length: int, n_samples: int, device: torch.device,
    autocast_dtype: torch.dtype | None, seed: int = 1234, sp: SeqShard | None = None,
) -> float:
    """Share of prompts whose every answer token is the argmax prediction (= greedy exact match)."""
    ds = PasskeyDataset(tokenizer, length, n_samples, seed)
    correct = 0
    for i in range(n_samples):
        out = forward_loss(model, collate([ds[i]]), device, autocast_dtype, False, sp, want_correct=True)
        wrong = (out.n_tokens - out.correct_BS.sum()).reshape(1).float()
        if sp is not None:  # the answer may straddle sequence shards
            dist.all_reduce(wrong, group=sp.group)
        correct += int(wrong.item() == 0)
    return correct / max(n_samples, 1)


@torch.no_grad()
def passkey_grid(
    model: nn.Module, tokenizer: Tokenizer, lengths: list[int], depths: list[float], samples: int,
    device: torch.device, autocast_dtype: torch.dtype | None, seed: int = 1234, sp: SeqShard | None = None,
) -> dict[str, dict[str, float]]:
    """Passkey accuracy per (length, depth): ``{str(length): {f"{depth:g}": accuracy}}``.

    Each cell holds ``samples`` prompts with the key at that relative depth (0 = start, 1 = end).
    """
    grid: dict[str, dict[str, float]] = {}
    for length in lengths:
        row = {}
        for d_i, depth in enumerate(depths):
            correct = 0
            for i in range(samples):
                g = torch.Generator().manual_seed(seed * 1_000_003 + length * 1009 + d_i * 101 + i)
                tokens, labels = passkey_sample(tokenizer, length, depth, g)
                out = forward_loss(model, collate([Sample(tokens, labels)]), device, autocast_dtype, False, sp,
                                   want_correct=True)
                wrong = (out.n_tokens - out.correct_BS.sum()).reshape(1).float()
                if sp is not None:
                    dist.all_reduce(wrong, group=sp.group)
                correct += int(wrong.item() == 0)
            row[f"{depth:g}"] = correct / max(samples, 1)
        grid[str(length)] = row
    return grid


@torch.no_grad()
def perplexity_by_length(
    model: nn.Module, windows_for_length, lengths: list[int], n_windows: int, device: torch.device,
    autocast_dtype: torch.dtype | None, sp: SeqShard | None = None,
) -> dict[str, float]:
    """Perplexity at each context length L: ``n_windows`` held-out windows of L tokens, loss on their
    second half (every scored token sees between L/2 and L tokens of context).

    Args:
        windows_for_length: ``L -> dataset`` of L-token held-out windows (e.g. ``TokenWindows``).
    """
    out = {}
    for length in lengths:
        ds = windows_for_length(length)
        n = min(len(ds), n_windows)
        if n == 0:
            continue
        total, count = 0.0, 0
        for i in range(n):
            smp = ds[i]
            labels = smp.labels.clone()
            labels[: length // 2] = IGNORE_INDEX
            b = collate([Sample(smp.tokens, labels, None)])  # one document: the context may cross boundaries
            res = forward_loss(model, b, device, autocast_dtype, False, sp)
            sums = torch.stack([res.loss_sum.float(), res.n_tokens.float()])
            if sp is not None:
                dist.all_reduce(sums, group=sp.group)
            total += float(sums[0])
            count += int(sums[1])
        out[str(length)] = math.exp(min(total / max(count, 1), 50.0))
    return out


def mqar_buckets(seq_len: int) -> list[int]:
    """Upper bounds of the key-to-query distance buckets of ``mqar_acc@<D>``: powers of two from 16 up to
    the sequence length (a bucket holds distances in (D/2, D], the first one all up to 16)."""
    bounds, d = [], 16
    while d < seq_len:
        bounds.append(d)
        d *= 2
    return [*bounds, seq_len]


@torch.no_grad()
def mqar_accuracy(
    model: nn.Module, seq_len: int, vocab_size: int, num_kv_pairs: int, samples: int, device: torch.device,
    autocast_dtype: torch.dtype | None, seed: int = 4321, sp: SeqShard | None = None,
) -> dict[str, float]:
    """Share of MQAR queries whose value is the argmax prediction (Zoology's accuracy), overall
    (``mqar_acc``) and by the distance from the key to its query (``mqar_acc@<D>``, see
    :func:`mqar_buckets`; a bucket without queries is left out)."""
    ds = MQARDataset(seq_len, vocab_size, num_kv_pairs, samples, seed)
    bounds = torch.tensor(mqar_buckets(seq_len))
    counts = torch.zeros(2, len(bounds))  # (right, total) per distance bucket
    for i in range(samples):
        sample = ds[i]
        batch = collate([sample])
        if sp is not None:  # this rank's shard, with the global positions of its tokens
            batch = sp.shard(batch["tokens"], batch["labels"], None)
        out = forward_loss(model, batch, device, autocast_dtype, False, None, want_correct=True)
        positions = batch["position_ids"][0].cpu() if sp is not None else torch.arange(seq_len)
        distance = torch.full((seq_len,), -1, dtype=torch.long)
        distance[(sample.labels != IGNORE_INDEX).nonzero().flatten()] = mqar_distances(
            sample.tokens, sample.labels, num_kv_pairs)
        local = distance[positions]
        asked = local >= 0
        bucket = torch.bucketize(local[asked], bounds)
        counts[0].index_add_(0, bucket, out.correct_BS[0].cpu()[asked].float())
        counts[1].index_add_(0, bucket, torch.ones(int(asked.sum())))
    if sp is not None:
        counts = counts.to(device)
        dist.all_reduce(counts, group=sp.group)
        counts = counts.cpu()
    right, total = counts
    out_acc = {"mqar_acc": float(right.sum() / total.sum().clamp_min(1))}
    for d, r, t in zip(bounds.tolist(), right.tolist(), total.tolist()):
        if t:
            out_acc[f"mqar_acc@{d}"] = r / t
    return out_acc


def evaluate(
    model: nn.Module, *, val_dataset, tokenizer: Tokenizer, seq_len: int, val_batches: int, batch_size: int,
    passkey_lengths: list[int], passkey_samples: int, device: torch.device, autocast_dtype: torch.dtype | None,
    doc_mask: bool = True, sp: SeqShard | None = None, ppl_lengths: list[int] | None = None,
    windows_for_length=None, ppl_windows: int = 4, mqar_samples: int = 0, mqar_num_kv_pairs: int = 16,
) -> dict[str, Any]:
    """Run every evaluation and return flat metrics (``val_loss``, ``val_ppl``, ``passkey_acc@N``,
    ``ppl@L`` for ``ppl_lengths`` when ``windows_for_length`` gives held-out windows, ``mqar_acc``).

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
    if ppl_lengths and windows_for_length is not None:
        for n, ppl in perplexity_by_length(model, windows_for_length, ppl_lengths, ppl_windows, device,
                                           autocast_dtype, sp).items():
            out[f"ppl@{n}"] = ppl
    if mqar_samples > 0:
        vocab = unwrap(model).cfg.vocab_size
        out.update(mqar_accuracy(model, seq_len, vocab, mqar_num_kv_pairs, mqar_samples, device, autocast_dtype,
                                 sp=sp))
    model.train(was_training)
    return out


def plot_results(results: dict[str, Any], path: str) -> str:
    """PNG with the passkey grid as a heatmap (lengths x depths) and perplexity vs context length.

    Needs matplotlib (``pip install longshard[eval]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from longshard.errors import ConfigError

        raise ConfigError("--plot", "matplotlib is not installed.", "pip install 'longshard[eval]'.") from e
    grid = results.get("passkey_grid") or {}
    ppl = {int(k.split("@")[1]): v for k, v in results.items() if k.startswith("ppl@")}
    panels = int(bool(grid)) + int(bool(ppl))
    if panels == 0:
        raise ValueError("nothing to plot: no passkey grid and no ppl@L results")
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax_i = 0
    if grid:
        lengths = sorted(grid, key=int)
        depths = list(grid[lengths[0]])
        acc = [[grid[n][d] for n in lengths] for d in depths]  # rows: depth, columns: length
        ax = axes[0][ax_i]
        im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("key depth (0 = start)")
        ax.set_title("passkey retrieval accuracy")
        for r, row in enumerate(acc):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax)
        ax_i += 1
    if ppl:
        ax = axes[0][ax_i]
        xs = sorted(ppl)
        ax.plot(xs, [ppl[x] for x in xs], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity (second half of each window)")
        ax.set_title("perplexity vs context length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def held_out_windows(cfg: Config):
    """``L -> held-out windows of L tokens`` when the run's prepared held-out data is on this machine,
    else None."""
    data = cfg.data_dir
    if data is None or not (data / "meta.json").is_file():
        return None
    return lambda length: TokenWindows(data, "val", length)


def evaluate_config(model: nn.Module, cfg: Config, *, val_dataset, tokenizer: Tokenizer, device: torch.device,
                    sp: SeqShard | None = None, passkey: bool = True) -> dict[str, Any]:
    """:func:`evaluate` with every setting read from the run's config (``eval.*``, ``train.seq_len``,
    the micro-batch, the compute dtype, ``data.doc_mask``): the one mapping the trainer and
    ``longshard eval`` share.

    Args:
        model: the model to evaluate (sharded: every rank calls this).
        cfg: the run's config.
        val_dataset: held-out windows of ``train.seq_len`` tokens, or None.
        tokenizer: the run's tokenizer (passkey prompts).
        device: where the model runs.
        sp: this rank's sequence shard under sequence parallelism.
        passkey: False leaves passkey accuracy out (``longshard eval --grid`` measures it per depth).
    """
    return evaluate(
        model, val_dataset=val_dataset, tokenizer=tokenizer, seq_len=cfg.train.seq_len,
        val_batches=cfg.eval.val_batches, batch_size=cfg.train.micro_batch_size,
        passkey_lengths=passkey_lengths(cfg), passkey_samples=cfg.eval.passkey_samples if passkey else 0,
        device=device, autocast_dtype=compute_dtype(cfg.train.dtype), doc_mask=cfg.data.doc_mask, sp=sp,
        ppl_lengths=list(cfg.eval.ppl_lengths), windows_for_length=held_out_windows(cfg),
        ppl_windows=cfg.eval.ppl_windows, mqar_samples=cfg.eval.mqar_samples,
        mqar_num_kv_pairs=cfg.eval.mqar_num_kv_pairs,
    )
