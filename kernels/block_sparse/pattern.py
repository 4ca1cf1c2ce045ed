"""Per-head block-sparse attention patterns shared by every block-sparse path."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SparsePattern:
    """Which keys each head's queries may read, at block and token granularity.

    A query at position q of head h may attend to key position k iff
    ``k <= q`` (causal), same document (packed data), ``block_mask_HQN[h, q // block, k // block]``,
    and, when ``window_H[h] > 0``, ``q - k < window_H[h] or k < sink_H[h]`` (token-level
    sliding window with attention sinks). Heads index query heads.

    Args:
        block: block size in tokens.
        block_mask_HQN: (H, nQ, nK) bool over query/key blocks; must keep each diagonal block.
        window_H: (H,) long token window per head, 0 = no token-level window.
        sink_H: (H,) long number of leading sink tokens per head (used with a window).
        cache: derived index structures of fast paths (e.g. the Triton kernel's block lists).
    """

    block: int
    block_mask_HQN: torch.Tensor
    window_H: torch.Tensor | None = None
    sink_H: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_heads(self) -> int:
        return self.block_mask_HQN.shape[0]

    def to(self, device: torch.device) -> SparsePattern:
        mv = lambda t: None if t is None else t.to(device)
        return SparsePattern(self.block, self.block_mask_HQN.to(device), mv(self.window_H), mv(self.sink_H))

    def head_slice(self, start: int, stop: int) -> SparsePattern:
        """The pattern of query heads [start, stop)."""
        cut = lambda t: None if t is None else t[start:stop]
        return SparsePattern(self.block, self.block_mask_HQN[start:stop], cut(self.window_H), cut(self.sink_H))

    def kept_fraction(self) -> float:
        """Kept (query-block, key-block) pairs over the causal lower triangle, averaged over heads."""
        n = self.block_mask_HQN.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=self.block_mask_HQN.device).tril()
        return float((self.block_mask_HQN & causal).sum() / (causal.sum() * self.n_heads))


def kept_first(keep: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Indices along the last dim with the kept entries first, each part ascending (the one block
    ordering of every block-list path: gather, Triton CSR lists, chunked far blocks, gathered buffers,
    decoding plans); the first ``width`` columns when given.

    Args:
        keep: (..., n) bool.
        width: columns to return (e.g. the largest kept count), or None for all n.
    """
    n = keep.shape[-1]
    order = torch.arange(n, device=keep.device)
    idx = torch.where(keep, order, order + n).argsort(-1)
    return idx if width is None else idx[..., :width]


def token_keep(
    pattern: SparsePattern,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    head_idx: torch.Tensor,
) -> torch.Tensor:
    """Token-level keep-mask (without documents), broadcasting q_pos/k_pos/head_idx.

    Args:
        pattern: the pattern.
        q_pos, k_pos: absolute positions (long), broadcastable to each other and ``head_idx``.
        head_idx: query-head indices (long), broadcastable likewise.
    """
    n_k_blocks = pattern.block_mask_HQN.shape[-1]
    kb = (k_pos // pattern.block).clamp_max(n_k_blocks - 1)
    keep = (k_pos <= q_pos) & pattern.block_mask_HQN[head_idx, q_pos // pattern.block, kb]
    if pattern.window_H is not None:
        w = pattern.window_H[head_idx]
        s = pattern.sink_H[head_idx] if pattern.sink_H is not None else torch.zeros_like(w)
        keep = keep & ((w <= 0) | (q_pos - k_pos < w) | (k_pos < s))
    return keep


def dense_mask(
    pattern: SparsePattern, q_len: int, k_len: int, doc_ids_BS: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Full (B or 1, H, q_len, k_len) bool mask; queries are the last ``q_len`` key positions."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    heads = torch.arange(pattern.n_heads, device=device)
    keep = token_keep(pattern, q_pos[None, :, None], k_pos[None, None, :], heads[:, None, None])[None]
    if doc_ids_BS is not None:
        same = doc_ids_BS[:, k_len - q_len :, None] == doc_ids_BS[:, None, :]
        keep = keep & same[:, None]
    return keep


def sink_window_pattern(
    n_blocks: int, block: int, n_heads: int, streaming_H: torch.Tensor, sink: int, window: int
) -> SparsePattern:
    """Pattern where heads with ``streaming_H[h]`` read sink + window, the others everything."""
    i = torch.arange(n_blocks)[:, None]
    j = torch.arange(n_blocks)[None, :]
    causal = j <= i
    near = (i - j) * block < window + block  # blocks that can hold a key within the window
    sinks = j * block < sink
    stream_blocks = causal & (near | sinks)
    mask = torch.where(streaming_H[:, None, None], stream_blocks[None], causal[None].expand(n_heads, -1, -1))
    window_H = torch.where(streaming_H, window, 0).long()
    sink_H = torch.where(streaming_H, sink, 0).long()
    return SparsePattern(block, mask, window_H, sink_H)
