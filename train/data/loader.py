"""Map-style datasets and a deterministic, resumable distributed batch loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from longshard.errors import ConfigError
from longshard.train.data.prepare import META as META_NAME
from longshard.train.data.prepare import read_meta
from longshard.train.data.synthetic import mqar_pairs_for, mqar_sample, passkey_sample
from longshard.train.data.tokenizer import Tokenizer


@dataclass
class Sample:
    """One training sequence.

    Args:
        tokens: (S,) input ids.
        labels: (S,) next-token targets (``IGNORE_INDEX`` = no loss).
        doc_ids: (S,) document index per token for packed data, or None.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor | None = None


class TokenWindows:
    """Non-overlapping windows of ``seq_len`` (+1 for the shifted labels) over a prepared split.

    Document ids come from the BOS tokens, so packed documents never attend to each other
    when the model is given ``doc_ids``.

    Args:
        path: prepared folder (see :mod:`longshard.train.data.prepare`).
        split: ``train`` or ``val``.
        seq_len: tokens per sample.
    """

    def __init__(self, path: str | Path, split: str, seq_len: int) -> None:
        self.meta = read_meta(path)
        info = self.meta["splits"][split]
        self.seq_len = seq_len
        self.bos_id = self.meta["bos_id"]
        self.vocab_size = self.meta["vocab_size"]
        n = info["n_tokens"]
        self.file = Path(path) / info["file"]
        self.tokens = np.memmap(self.file, dtype=self.meta["dtype"], mode="r", shape=(n,)) if n else None
        self.n = max((n - 1) // seq_len, 0)
        if split == "train" and self.n == 0:
            raise ConfigError("train.seq_len", f"{path} has {n} training tokens, fewer than seq_len+1={seq_len + 1}.",
                              "use a shorter seq_len or more data.")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        w = torch.from_numpy(self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
        outside = (w >= self.vocab_size) | (w < 0)  # a damaged or foreign file: named, never an IndexError
        if bool(outside.any()):
            at = int(torch.argmax(outside.int()))
            raise ConfigError("data.path", f"{self.file} holds token id {int(w[at])} (at token "
                              f"{i * self.seq_len + at}), but its vocabulary has ids 0-{self.vocab_size - 1} "
                              f"({META_NAME}).",
                              "re-run `longshard data prepare`; the file is damaged or from another tokenizer.")
        tokens, labels = w[:-1], w[1:]
        return Sample(tokens, labels, torch.cumsum(tokens == self.bos_id, 0))


class PasskeyDataset:
    """Passkey-retrieval prompts with the key at depths spread over [0, 1]; deterministic per index."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, n: int, seed: int) -> None:
        self.tokenizer, self.seq_len, self.n, self.seed = tokenizer, seq_len, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        depth = (i % 11) / 10
        tokens, labels = passkey_sample(self.tokenizer, self.seq_len, depth, g)
        return Sample(tokens, labels)


class MQARDataset:
    """Multi-query associative recall sequences; deterministic per index.

    Args:
        seq_len: tokens per sequence.
        vocab_size: ids the task draws from (see :func:`mqar_sample`).
        num_kv_pairs: key/value pairs of a ``seq_len``-token document.
        n: samples.
        seed: base seed (sample ``i`` is drawn from ``seed`` and ``i`` alone).
        curriculum: document lengths of a sequence-length warmup; sample ``i`` belongs to phase
            ``i * len(curriculum) // curriculum_samples`` (the last phase from then on) and packs
            ``seq_len / L`` independent documents of ``L`` tokens (document ids set, so a document-masked
            model never reads across them), each with ``mqar_pairs_for(num_kv_pairs, L, seq_len)``
            pairs: the same queries per token in every phase.
            Empty: one document per sequence.
        curriculum_samples: samples the curriculum spans (a run's steps x global batch); default ``n``.
    """

    def __init__(self, seq_len: int, vocab_size: int, num_kv_pairs: int, n: int, seed: int,
                 curriculum: list[int] | None = None, curriculum_samples: int | None = None) -> None:
        self.seq_len, self.vocab_size, self.num_kv_pairs, self.n, self.seed = seq_len, vocab_size, num_kv_pairs, n, seed
        self.curriculum = list(curriculum or [])
        self.curriculum_samples = max(1, curriculum_samples or n)

    def __len__(self) -> int:
        return self.n

    def doc_len(self, i: int) -> int:
        """Document length of sample ``i``."""
        if not self.curriculum:
            return self.seq_len
        return self.curriculum[min(i * len(self.curriculum) // self.curriculum_samples, len(self.curriculum) - 1)]

    def __getitem__(self, i: int) -> Sample:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        if not self.curriculum:
            tokens, labels = mqar_sample(self.seq_len, self.vocab_size, self.num_kv_pairs, g)
            return Sample(tokens, labels)
        L = self.doc_len(i)
        k = mqar_pairs_for(self.num_kv_pairs, L, self.seq_len)
        docs = [mqar_sample(L, self.vocab_size, k, g) for _ in range(self.seq_len // L)]
        doc_ids = torch.arange(len(docs)).repeat_interleave(L)
        return Sample(torch.cat([t for t, _ in docs]), torch.cat([lab for _, lab in docs]), doc_ids)


def collate(samples: list[Sample]) -> dict[str, torch.Tensor | None]:
    """Stack samples into (B, S) tensors."""
    docs = [s.doc_ids for s in samples]
    return {
        "tokens": torch.stack([s.tokens for s in samples]),
        "labels": torch.stack([s.labels for s in samples]),
        "doc_ids": None if any(d is None for d in docs) else torch.stack(docs),
    }


class DistributedLoader:
    """Deterministic shuffled batches for data parallel training, resumable from its state.

    Every optimizer step consumes the next ``global_batch`` indices of the epoch's permutation;
    data-parallel rank ``r`` takes, for micro-batch ``m``, the slice starting at
    ``(m * dp_size + r) * micro_batch_size``. The global set of samples per step therefore does not
    depend on the layout, so any (dp_size, grad_accum) split of the same global batch trains on
    the same data.

    Args:
        dataset: map-style dataset of :class:`Sample`.
        micro_batch_size: sequences per forward pass on one rank.
        grad_accum: micro-batches per optimizer step.
        dp_rank, dp_size: this rank and the data-parallel world size.
        seed: shuffling seed.
        shuffle: shuffle per epoch (else sequential).
    """

    def __init__(
        self, dataset, *, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int,
        shuffle: bool = True,
    ) -> None:
        self.dataset = dataset
        self.mb, self.accum, self.rank, self.world = micro_batch_size, grad_accum, dp_rank, dp_size
        self.global_batch = micro_batch_size * grad_accum * dp_size
        if len(dataset) < self.global_batch:
            raise ConfigError("train.global_batch_size",
                              f"the dataset has {len(dataset)} samples, fewer than one global batch "
                              f"({self.global_batch}).",
                              "lower the batch size or seq_len, or use more data.")
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))

    def next_step(self) -> list[dict[str, torch.Tensor | None]]:
        """The ``grad_accum`` micro-batches of this rank for the next optimizer step."""
        if self.index + self.global_batch > len(self._perm):
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        out = []
        for m in range(self.accum):
            start = self.index + (m * self.world + self.rank) * self.mb
            idx = self._perm[start : start + self.mb].tolist()
            out.append(collate([self.dataset[i] for i in idx]))
        self.index += self.global_batch
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ConfigError("train.global_batch_size",
                              f"checkpoint was written with global batch {state['global_batch']}, "
                              f"now {self.global_batch}.",
                              "resume with the same global batch size (the layout may change).")
        self.epoch, self.index = state["epoch"], state["index"]
        self._perm = self._permutation()
