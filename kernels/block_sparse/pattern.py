"""Per-head block-sparse attention patterns shared by every block-sparse path.

A band-shaped variant (S2, streaming heads, sliding windows) describes its pattern once, as a
:class:`BandFarSpec` (a band of recent blocks, per-head far blocks, token windows/sinks, heads that
read everything); the band paths run that description directly and every other form derives from
it: :meth:`BandFarSpec.to_pattern` gives the :class:`SparsePattern` (block mask, token window and
sinks) from which the gather lists, Triton CSR lists, flex block masks and decoding plans come, and
:meth:`BandFarSpec.head_slice` the heads of one rank.
"""

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


@dataclass
class BandFarSpec:
    """Which keys a query may read: band + far blocks, then token-level window/sink rules.

    A query at position q (block i) of head h reads key position k (block j) iff ``k <= q`` and
    same document and: ``full_H[h]`` (the head reads every earlier key), or ``i - j < band_blocks``
    (band; with ``window_H[h] > 0`` further restricted to ``q - k < window_H[h] or k < sink_H[h]``),
    or ``j`` is in ``far_HF[h]`` with ``j <= i - band_blocks`` (far; with ``far_token_limit_H[h] > 0``
    only ``k < far_token_limit_H[h]``).

    Args:
        block: block size in tokens.
        band_blocks: L, most recent blocks (the query's own included).
        far_HF: (H, F) long ascending far key-block ids per query head, -1 = padding; None = none.
        window_H, sink_H: (H,) token window / sink inside the band (0 = no restriction).
        far_token_limit_H: (H,) far keys must lie before this position (0 = no limit).
        full_H: (H,) bool, heads with full causal attention (e.g. retrieval heads); None = none.
            The band kernels take specs without such heads: split them off first (see
            :meth:`has_full_heads`, :meth:`select_heads`).
    """

    block: int
    band_blocks: int
    far_HF: torch.Tensor | None = None
    window_H: torch.Tensor | None = None
    sink_H: torch.Tensor | None = None
    far_token_limit_H: torch.Tensor | None = None
    full_H: torch.Tensor | None = None

    def _per_head(self) -> list[torch.Tensor | None]:
        return [self.far_HF, self.window_H, self.sink_H, self.far_token_limit_H, self.full_H]

    @property
    def n_heads(self) -> int:
        """Heads the spec describes (read from its first per-head tensor)."""
        for t in self._per_head():
            if t is not None:
                return t.shape[0]
        raise ValueError("a BandFarSpec without per-head tensors does not know its head count")

    def select_heads(self, index: slice | torch.Tensor) -> BandFarSpec:
        """The spec of the query heads ``index`` selects (a slice, bool mask or index tensor)."""
        far, window, sink, limit, full = (None if t is None else t[index] for t in self._per_head())
        return BandFarSpec(self.block, self.band_blocks, far, window, sink, limit, full)

    def head_slice(self, start: int, stop: int) -> BandFarSpec:
        """The spec of query heads [start, stop) (one rank's heads under Ulysses or tensor parallel)."""
        return self.select_heads(slice(start, stop))

    def has_full_heads(self) -> bool:
        return self.full_H is not None and bool(self.full_H.any())

    def block_mask(self, n_blocks: int) -> torch.Tensor:
        """(H, n_blocks, n_blocks) bool: key blocks each query block of each head may read (causal)."""
        H = self.n_heads
        i = torch.arange(n_blocks)[:, None]
        j = torch.arange(n_blocks)[None, :]
        causal = j <= i
        far_HN = torch.zeros(H, n_blocks, dtype=torch.bool)
        if self.far_HF is not None:
            ids = self.far_HF.cpu()
            ok = (ids >= 0) & (ids < n_blocks)
            far_HN[torch.arange(H)[:, None].expand_as(ids)[ok], ids[ok]] = True
        mask = causal & ((i - j < self.band_blocks) | far_HN[:, None, :])
        if self.full_H is not None:
            mask = torch.where(self.full_H.cpu()[:, None, None], causal, mask)
        return mask

    def to_pattern(self, n_blocks: int) -> SparsePattern:
        """The same pattern as a :class:`SparsePattern` over ``n_blocks`` blocks.

        The pattern's token rule (``q - k < window or k < sink`` in every kept block) says what the
        spec says when far keys of windowed heads are limited to the sinks and the band covers the
        window; a spec that needs anything else has no pattern form (ValueError).
        """
        H = self.n_heads
        full = self.full_H.cpu() if self.full_H is not None else torch.zeros(H, dtype=torch.bool)
        zeros = torch.zeros(H, dtype=torch.long)
        window = self.window_H.cpu() if self.window_H is not None else zeros
        sink = self.sink_H.cpu() if self.sink_H is not None else zeros
        limit = self.far_token_limit_H.cpu() if self.far_token_limit_H is not None else zeros
        has_far = (self.far_HF.cpu() >= 0).any(-1) if self.far_HF is not None else torch.zeros(H, dtype=torch.bool)
        windowed = ~full & (window > 0)
        far_rule_ok = ~has_far | full | torch.where(windowed, (limit == sink) & ((self.band_blocks - 1) * self.block
                                                                                  >= window), limit <= 0)
        if not bool(far_rule_ok.all()):
            bad = torch.nonzero(~far_rule_ok).flatten().tolist()
            raise ValueError(f"heads {bad}: far-block token limits other than the sinks of a windowed head "
                             "(or a window wider than the band) have no SparsePattern form")
        mask = self.block_mask(n_blocks)
        if self.window_H is None:
            return SparsePattern(self.block, mask)
        return SparsePattern(self.block, mask, torch.where(full, 0, window), torch.where(full, 0, sink))


def sink_window_spec(block: int, streaming_H: torch.Tensor, sink: int, window: int) -> BandFarSpec:
    """Heads with ``streaming_H[h]`` read ``sink`` leading tokens plus the ``window`` most recent
    ones (band: the blocks a window can reach; far: the sink blocks); the others read everything.

    Args:
        block: block size in tokens.
        streaming_H: (H,) bool per query head.
        sink, window: tokens (window includes the query's own position).
    """
    streaming_H = streaming_H.cpu()
    H = streaming_H.shape[0]
    far = torch.arange(-(-sink // block))[None].expand(H, -1)
    per_head = lambda v: torch.where(streaming_H, v, 0).long()
    full = None if bool(streaming_H.all()) else ~streaming_H
    return BandFarSpec(block, (window - 1) // block + 2, far, per_head(window), per_head(sink), per_head(sink), full)


def sink_window_pattern(
    n_blocks: int, block: int, n_heads: int, streaming_H: torch.Tensor, sink: int, window: int
) -> SparsePattern:
    """Pattern where heads with ``streaming_H[h]`` read sink + window, the others everything
    (:func:`sink_window_spec` as a :class:`SparsePattern`; ``n_heads`` must be its length)."""
    if streaming_H.shape[0] != n_heads:
        raise ValueError(f"streaming_H has {streaming_H.shape[0]} heads, expected {n_heads}")
    return sink_window_spec(block, streaming_H, sink, window).to_pattern(n_blocks)
