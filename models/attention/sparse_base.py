"""Shared machinery of block-sparse variants: pattern caching and path dispatch."""

from __future__ import annotations

import math

import torch
from longshard.errors import require
from longshard.kernels.attention.naive import attention_gathered
from longshard.kernels.block_sparse import (
    SparsePattern,
    block_sparse_attention_gather,
    block_sparse_attention_naive,
)
from longshard.kernels.block_sparse.banded import BandFarSpec, band_far_attention
from longshard.kernels.block_sparse.chunked import band_far_attention_chunked
from longshard.kernels.block_sparse.flex import block_sparse_attention_flex, flex_available
from longshard.kernels.block_sparse.pattern import kept_first, token_keep
from longshard.kernels.block_sparse.triton import (
    TRITON_BLOCKS,
    block_sparse_attention_triton,
    triton_block_ok,
)
from longshard.kernels.triton_support import triton_installed
from longshard.models.attention.registry import AttentionBatch, AttentionContext, CoreAttention, DecodePlan

SPARSE_PATHS = ("auto", "naive", "gather", "banded", "chunked", "flex", "triton")
BAND_PATHS = {"banded": band_far_attention, "chunked": band_far_attention_chunked}


def check_path(path: str) -> None:
    require(path in SPARSE_PATHS, "path", f"unknown block-sparse path {path!r}.",
            f"use one of: {', '.join(SPARSE_PATHS)}.")


def slice_band_spec(spec: BandFarSpec, start: int, stop: int) -> BandFarSpec:
    """The band + far spec of query heads [start, stop)."""
    cut = lambda t: None if t is None else t[start:stop]
    return BandFarSpec(spec.block, spec.band_blocks, cut(spec.far_HF), cut(spec.window_H), cut(spec.sink_H),
                       cut(spec.far_token_limit_H))


class BlockSparseAttention(CoreAttention):
    """Base of block-sparse variants: subclasses implement :meth:`build_pattern`.

    Paths: ``naive`` (full masked score matrix, the reference), ``gather`` (kept K/V blocks only,
    any pattern), ``banded`` (band + far blocks as block matmuls, for variants that define
    :meth:`band_spec`), ``chunked`` (band + far blocks as one fused SDPA call per chunk of query
    blocks; the fastest CPU training path), ``flex`` (flex_attention BlockMask; CUDA
    forward+backward), ``triton`` (our per-head block-list kernel, forward+backward; CUDA, or the
    CPU interpreter), ``auto`` (on CUDA: triton when installed and the block is a kernel tile
    size, else flex; on CPU: chunked, else gather, for training/prefill; naive when decoding).
    """

    supports_offload = True
    cp_form = "sparse_exchange"

    def __init__(self, ctx: AttentionContext, block: int, path: str) -> None:
        super().__init__(ctx)
        require(path != "triton" or triton_block_ok(block), "block",
                f"path triton needs a block in {TRITON_BLOCKS} (the kernel tile), got {block}.",
                "change block or use path auto/gather.")
        self.block, self.path = block, path
        self._cache: dict[tuple[int, str], SparsePattern] = {}
        self.head_slice: tuple[int, int] | None = None

    def set_head_slice(self, start: int, stop: int) -> None:
        self.head_slice = (start, stop)
        self._cache.clear()

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Dense causal FLOPs times the kept share of causal (query block, key block) pairs."""
        return self.kept_fraction(seq_len) * super().attention_flops_per_token(seq_len)

    def kept_fraction(self, seq_len: int) -> float:
        """Kept share of causal (query block, key block) pairs of the pattern at ``seq_len``."""
        return self.pattern(math.ceil(seq_len / self.block), torch.device("cpu")).kept_fraction()

    def build_pattern(self, n_blocks: int) -> SparsePattern:  # pragma: no cover - interface
        raise NotImplementedError

    def band_spec(self, n_blocks: int) -> BandFarSpec | None:
        """The pattern as band + far blocks, when it has that shape (None = use gather)."""
        return None

    def pattern(self, n_blocks: int, device: torch.device) -> SparsePattern:
        """The (cached) pattern over ``n_blocks`` blocks on ``device``."""
        key = (n_blocks, str(device))
        if key not in self._cache:
            pat = self.build_pattern(n_blocks)
            if self.head_slice is not None:
                pat = pat.head_slice(*self.head_slice)
            self._cache[key] = pat.to(device)
        return self._cache[key]

    def resolve_path(self, q_BHSD: torch.Tensor, k_len: int) -> str:
        if self.path != "auto":
            return self.path
        if q_BHSD.shape[2] != k_len:
            return "naive"
        if q_BHSD.is_cuda and triton_installed() and triton_block_ok(self.block):
            return "triton"
        if q_BHSD.is_cuda and flex_available():
            return "flex"
        return "chunked" if self.band_spec(1) is not None else "gather"

    def forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        k_len = k_BHSD.shape[2]
        path = self.resolve_path(q_BHSD, k_len)
        if path in BAND_PATHS:
            return self.banded_forward(q_BHSD, k_BHSD, v_BHSD, batch, BAND_PATHS[path])
        pat = self.pattern(math.ceil(k_len / self.block), q_BHSD.device)
        fn = {
            "naive": block_sparse_attention_naive,
            "gather": block_sparse_attention_gather,
            "flex": block_sparse_attention_flex,
            "triton": block_sparse_attention_triton,
        }[path]
        return fn(q_BHSD, k_BHSD, v_BHSD, pat, batch.doc_ids_BS)

    def banded_forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch,
        fn=band_far_attention,
    ) -> torch.Tensor:
        """The band + far form through ``fn`` (:func:`band_far_attention` or the chunked SDPA form)."""
        spec = self.band_spec(math.ceil(k_BHSD.shape[2] / self.block))
        if spec is not None and self.head_slice is not None:
            spec = slice_band_spec(spec, *self.head_slice)
        if spec is None:
            raise ValueError(f"{type(self).__name__} has no band + far form: use path gather")
        return fn(q_BHSD, k_BHSD, v_BHSD, spec, batch.doc_ids_BS)

    # --- offloaded decoding (see longshard.models.offload) ------------------------------------
    def _decode_pattern(self, k_len: int, device: torch.device) -> SparsePattern:
        """The pattern covering ``k_len`` keys, rebuilt only when the block count changes."""
        n_all = math.ceil(k_len / self.block)
        held = getattr(self, "_decode_pat", None)
        if held is None or held[0] != (n_all, str(device)):
            pat = self.build_pattern(n_all)
            if self.head_slice is not None:
                pat = pat.head_slice(*self.head_slice)
            self._decode_pat = ((n_all, str(device)), pat.to(device))
        return self._decode_pat[1]

    @torch.no_grad()
    def decode_plan(self, q_BH1D: torch.Tensor, kbar_BKND: torch.Tensor, k_len: int) -> DecodePlan:
        """Complete key blocks the query block of position ``k_len - 1`` reads (union over a GQA group)."""
        B, H = q_BH1D.shape[:2]
        Hkv, n_complete = kbar_BKND.shape[1], kbar_BKND.shape[2]
        pat = self._decode_pattern(k_len, q_BH1D.device)
        row_HN = pat.block_mask_HQN[:, (k_len - 1) // self.block, :n_complete]
        row_KN = row_HN.view(Hkv, H // Hkv, n_complete).any(1)
        width = max(int(row_KN.sum(-1).max()) if n_complete else 0, 1)
        idx = kept_first(row_KN, width)  # listed blocks first, ascending
        ok = torch.gather(row_KN, 1, idx)
        blocks = torch.where(ok, idx, -1)
        return DecodePlan(blocks[None].expand(B, -1, -1))

    def attend_blocks(self, q_BH1D: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor,
                      kpos_BKL: torch.Tensor, bias_BKL: torch.Tensor | None, k_len: int) -> torch.Tensor:
        """Attention of one decoding query over gathered keys (positions ``kpos``, -1 = padding)."""
        H, Hkv = q_BH1D.shape[1], k_BKLD.shape[1]
        pat = self._decode_pattern(k_len, q_BH1D.device)
        kpos = kpos_BKL.repeat_interleave(H // Hkv, dim=1)  # (B, H, L)
        heads = torch.arange(H, device=kpos.device)[None, :, None]
        keep = token_keep(pat, torch.full_like(kpos, k_len - 1), kpos.clamp_min(0), heads) & (kpos >= 0)
        return attention_gathered(q_BH1D, k_BKLD, v_BKLD, keep, bias_BKL, 1.0 / math.sqrt(q_BH1D.shape[-1]))
