"""Attention of one (query chunk, key chunk) pair, fused, for code that splits one attention into pieces.

A ring step attends a rank's query chunk to a visiting key chunk that is either fully visible or the
same chunk (causal); packed documents restrict both. The forward returns the partial output and its
log-sum-exp (merged across pairs with :func:`~longshard.kernels.attention.fused_cpu.merge_partials`);
the backward takes the *merged* log-sum-exp and ``delta = rowsum(dO * O)`` of the whole attention, so
each pair's gradients are exact without keeping any pair's probabilities (as ring-flash-attn does with
flash-attn). Fused backends, picked by device:

* CUDA with flash-attn installed: flash-attn's own forward/backward for the pairs it takes
  (:mod:`longshard.kernels.attention.flash_pairs`), the Triton kernel below for the others;
* CPU: PyTorch's fused flash-attention CPU kernel (documents as an additive mask of the pair);
* CUDA (and CPU under ``TRITON_INTERPRET=1``): the block-sparse Triton kernel of
  :mod:`longshard.kernels.block_sparse.triton` with every block kept (or the causal ones), documents
  masked per tile, GQA heads read in place; tensor cores for fp16/bf16 with fp32 accumulation.

Shape letters: B batch, H query heads, K key/value heads, Q query rows, N key rows, D head dim.
The specification is :func:`pair_attention_naive` / :func:`pair_backward_naive` (fp32, explicit scores).
"""

from __future__ import annotations

import math

import torch
from longshard.kernels.attention.fused_cpu import additive_mask, fused_cpu_ops
from longshard.kernels.attention.naive import attention_naive


def pair_keep_mask(n_q: int, n_k: int, causal: bool, doc_q_BQ: torch.Tensor | None, doc_k_BN: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """(1 or B, 1, Q, N) keep mask of a pair, or None when every key is visible to every query."""
    mask = None
    if causal:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()[None, None]
    if doc_q_BQ is not None:
        same = (doc_q_BQ[:, :, None] == doc_k_BN[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def shares_document(doc_q_BQ: torch.Tensor | None, doc_k_BN: torch.Tensor | None) -> bool:
    """Whether any query of the pair may see any key (False: a pair with no shared document)."""
    if doc_q_BQ is None:
        return True
    shared = torch.stack([torch.isin(dq, dk).any() for dq, dk in zip(doc_q_BQ, doc_k_BN, strict=True)])
    return bool(shared.any())  # one host sync per pair


def pair_attention_naive(q_BHQD, k_BKND, v_BKND, scale: float, causal: bool, doc_q_BQ=None, doc_k_BN=None):
    """Specification of a pair's forward: ``(o_BHQD fp32, lse_BHQ fp32)``, -inf rows with no key."""
    mask = pair_keep_mask(q_BHQD.shape[2], k_BKND.shape[2], causal, doc_q_BQ, doc_k_BN, q_BHQD.device)
    o, lse = attention_naive(q_BHQD.float(), k_BKND, v_BKND, mask, scale, return_lse=True)
    return o, lse


def pair_backward_naive(do_BHQD, q_BHQD, k_BKND, v_BKND, lse_BHQ, delta_BHQ, scale: float, causal: bool,
                        doc_q_BQ=None, doc_k_BN=None):
    """Specification of a pair's backward from the merged statistics: ``(dq, dk, dv)`` in fp32."""
    B, H, _, D = q_BHQD.shape
    Hkv = k_BKND.shape[1]
    rep = H // Hkv
    q, do = q_BHQD.float(), do_BHQD.float()
    k, v = k_BKND.float().repeat_interleave(rep, 1), v_BKND.float().repeat_interleave(rep, 1)
    lse = torch.where(torch.isfinite(lse_BHQ), lse_BHQ, torch.zeros_like(lse_BHQ))
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    p = torch.exp(s - lse[..., None])
    mask = pair_keep_mask(q.shape[2], k.shape[2], causal, doc_q_BQ, doc_k_BN, q.device)
    if mask is not None:
        p = p.masked_fill(~mask, 0.0)
    ds = p * (torch.einsum("bhqd,bhkd->bhqk", do, v) - delta_BHQ[..., None])
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, k) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    dv = torch.einsum("bhqk,bhqd->bhkd", p, do)
    N = k.shape[2]
    return dq, dk.view(B, Hkv, rep, N, D).sum(2), dv.view(B, Hkv, rep, N, -1).sum(2)


class CpuPairs:
    """Pairs through PyTorch's fused CPU flash kernel (computed in fp32: the CPU kernel is exact there).

    Args:
        scale: softmax scale.
    """

    name = "cpu_fused"

    def __init__(self, scale: float) -> None:
        ops = fused_cpu_ops()
        if ops is None:
            raise RuntimeError("this PyTorch build lacks the fused CPU flash-attention ops")
        self.fwd, self.bwd = ops
        self.scale = scale

    @staticmethod
    def _expand(t: torch.Tensor, rep: int) -> torch.Tensor:
        return t.float().repeat_interleave(rep, 1)

    def forward(self, q_BHQD, k_BKND, v_BKND, causal: bool, doc_q_BQ=None, doc_k_BN=None):
        """``(o_BHQD fp32, lse_BHQ)`` of the pair (rows with no visible key: lse -inf)."""
        rep = q_BHQD.shape[1] // k_BKND.shape[1]
        q, k, v = q_BHQD.float(), self._expand(k_BKND, rep), self._expand(v_BKND, rep)
        if doc_q_BQ is None:
            return self.fwd(q, k, v, 0.0, causal, scale=self.scale)[:2]
        mask = pair_keep_mask(q.shape[2], k.shape[2], causal, doc_q_BQ, doc_k_BN, q.device)
        o, lse = self.fwd(q, k, v, 0.0, False, attn_mask=additive_mask(mask), scale=self.scale)[:2]
        return o, lse.masked_fill(~mask.any(-1), float("-inf"))  # rows with no key in this pair

    def backward(self, do_BHQD, q_BHQD, k_BKND, v_BKND, o_BHQD, lse_BHQ, delta_BHQ, causal: bool,
                 doc_q_BQ=None, doc_k_BN=None):
        """``(dq fp32, dk fp32, dv fp32)`` of the pair given the merged output and log-sum-exp."""
        B, Hkv, N, D = k_BKND.shape
        rep = q_BHQD.shape[1] // Hkv
        q, k, v = q_BHQD.float(), self._expand(k_BKND, rep), self._expand(v_BKND, rep)
        mask = pair_keep_mask(q.shape[2], N, causal, doc_q_BQ, doc_k_BN, q.device) if doc_q_BQ is not None else None
        dq, dk, dv = self.bwd(do_BHQD.float(), q, k, v, o_BHQD.float(), lse_BHQ, 0.0, causal and mask is None,
                              attn_mask=None if mask is None else additive_mask(mask), scale=self.scale)[:3]
        return dq, dk.view(B, Hkv, rep, N, D).sum(2), dv.view(B, Hkv, rep, N, -1).sum(2)


PAIR_BLOCK = 64  # the Triton tile for chunk pairs (a shipped launch setting; smaller chunks use 16 or 32)


class TritonPairs:
    """Pairs through the block-sparse Triton kernel with all blocks kept (or the causal ones).

    Inputs stay in their dtype (fp16/bf16 on tensor cores, fp32 accumulation); partial outputs and
    gradients come back in fp32 so that merging and summing over ring steps does not round.

    Args:
        scale: softmax scale.
    """

    name = "triton"

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self._csr: dict[tuple, tuple] = {}

    def _csr_of(self, n: int, H: int, Hkv: int, causal: bool, device: torch.device) -> tuple[int, tuple]:
        from longshard.kernels.block_sparse.triton import csr_indices

        block = min(PAIR_BLOCK, max(16, 1 << max(n - 1, 1).bit_length()))
        key = (n, H, Hkv, causal, str(device))
        if key not in self._csr:
            nb = math.ceil(n / block)
            full = torch.ones(1, H, nb, nb, dtype=torch.bool, device=device)
            self._csr[key] = csr_indices(full, nb, Hkv, block, causal=causal)
        return block, self._csr[key]

    @staticmethod
    def _check(q_BHQD, k_BKND) -> None:
        if q_BHQD.shape[2] != k_BKND.shape[2]:
            raise ValueError("Triton chunk pairs need query and key chunks of one length (zigzag chunks)")

    def forward(self, q_BHQD, k_BKND, v_BKND, causal: bool, doc_q_BQ=None, doc_k_BN=None):
        """``(o_BHQD fp32, lse_BHQ)`` of the pair (rows with no visible key: o 0, lse -inf)."""
        from longshard.kernels.block_sparse.triton import triton_forward

        self._check(q_BHQD, k_BKND)
        B, H, n, _ = q_BHQD.shape
        block, csr = self._csr_of(n, H, k_BKND.shape[1], causal, q_BHQD.device)
        return triton_forward(q_BHQD.contiguous(), k_BKND.contiguous(), v_BKND.contiguous(), csr, block, self.scale,
                              doc_q_BS=doc_q_BQ, doc_k_BS=doc_k_BN, q_shift=0 if causal else n,
                              out_dtype=torch.float32)

    def backward(self, do_BHQD, q_BHQD, k_BKND, v_BKND, o_BHQD, lse_BHQ, delta_BHQ, causal: bool,
                 doc_q_BQ=None, doc_k_BN=None):
        """``(dq, dk, dv)`` of the pair in fp32 given the merged log-sum-exp and delta."""
        from longshard.kernels.block_sparse.triton import triton_backward

        self._check(q_BHQD, k_BKND)
        B, H, n, _ = q_BHQD.shape
        block, csr = self._csr_of(n, H, k_BKND.shape[1], causal, q_BHQD.device)
        return triton_backward(do_BHQD.contiguous(), q_BHQD.contiguous(), k_BKND.contiguous(), v_BKND.contiguous(),
                               lse_BHQ.contiguous(), delta_BHQ.contiguous(), csr, block, self.scale,
                               doc_q_BS=doc_q_BQ, doc_k_BS=doc_k_BN, q_shift=0 if causal else n,
                               grad_dtype=torch.float32)[:3]


def pair_kernel(device: torch.device, scale: float, backend: str = "auto"):
    """The fused pair backend for ``device``.

    Args:
        device: where the chunks live.
        scale: softmax scale.
        backend: ``auto`` (CUDA: flash-attn's forward/backward with the log-sum-exp when flash-attn is
            installed, for the pairs it takes -- fp16/bf16, no packed documents -- and the Triton kernel
            for the others; CPU: PyTorch's fused kernel), or ``flash_attn`` / ``triton`` / ``cpu_fused``
            to force one (``triton`` on CPU needs ``TRITON_INTERPRET=1``: how the CUDA path is tested
            without a GPU).
    """
    from longshard.kernels.attention.flash_pairs import FlashAttnPairs, flash_attn_installed

    if backend == "auto":
        backend = ("flash_attn" if flash_attn_installed() else "triton") if device.type == "cuda" else "cpu_fused"
    if backend == "flash_attn":
        if not flash_attn_installed():
            raise ValueError("pair backend flash_attn: the flash-attn package is not installed "
                             "(pip install flash-attn --no-build-isolation), or use auto / triton")
        fallback = pair_kernel(device, scale, "triton" if device.type == "cuda" else "cpu_fused")
        return FlashAttnPairs(scale, fallback)
    if backend == "triton":
        from longshard.kernels.triton_support import require_triton

        require_triton(torch.empty(0, device=device), "ring attention on CUDA")
        return TritonPairs(scale)
    if backend == "cpu_fused":
        return CpuPairs(scale)
    raise ValueError(f"unknown pair backend {backend!r}: use auto, flash_attn, triton or cpu_fused")
