"""Dense causal softmax attention with selectable backends (SDPA, flash-attn, naive reference)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from longshard.errors import require
from longshard.kernels.attention.doc_chunked import causal_attention
from longshard.kernels.attention.naive import attention_naive, causal_doc_mask
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    register_attention,
)

DENSE_BACKENDS = ("auto", "sdpa", "flash", "naive")


@dataclass(kw_only=True)
class DenseOptions(AttentionOptions):
    """Options of ``dense``.

    Args:
        backend: ``auto`` (flash-attn on CUDA with fp16/bf16 when installed, else SDPA),
            ``sdpa`` (packed documents: document-bounded query chunks, see
            :mod:`longshard.kernels.attention.doc_chunked`), ``flash`` or ``naive`` (fp32
            reference, explicit score matrix).
        softmax_scale: score scale; default 1/sqrt(head_dim).
    """

    backend: str = "auto"
    softmax_scale: float | None = None

    def __post_init__(self) -> None:
        require(
            self.backend in DENSE_BACKENDS,
            "backend",
            f"unknown dense backend {self.backend!r}.",
            f"use one of: {', '.join(DENSE_BACKENDS)}.",
        )

    def context_parallel(self) -> str | None:
        return "ring"


def flash_attn_available() -> bool:
    """True when the flash-attn package is importable and CUDA is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _doc_cu_seqlens(doc_ids_BS: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence lengths over the flattened batch for flash-attn varlen."""
    flat = doc_ids_BS + torch.arange(doc_ids_BS.shape[0], device=doc_ids_BS.device)[:, None] * (
        int(doc_ids_BS.max()) + 1
    )
    flat = flat.flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    idx = torch.nonzero(starts).flatten().to(torch.int32)
    cu = torch.cat([idx, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])
    return cu, int((cu[1:] - cu[:-1]).max())


@register_attention("dense", DenseOptions)
class DenseAttention(CoreAttention):
    """Full causal softmax attention (GQA/MQA, packed documents)."""

    def __init__(self, ctx: AttentionContext, opts: DenseOptions) -> None:
        super().__init__(ctx, opts)
        self.scale = opts.softmax_scale or 1.0 / math.sqrt(ctx.head_dim)

    @property
    def softmax_scale(self) -> float:
        return self.scale

    def set_head_slice(self, start: int, stop: int) -> None:
        """Dense attention treats every head alike: nothing to restrict."""

    def resolve_backend(self, q_BHSD: torch.Tensor) -> str:
        """The backend this call uses (``auto`` resolved for the given input)."""
        if self.opts.backend != "auto":
            return self.opts.backend
        if q_BHSD.is_cuda and q_BHSD.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
            return "flash"
        return "sdpa"

    def forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        backend = self.resolve_backend(q_BHSD)
        doc = batch.doc_ids_BS
        if backend == "naive":
            mask = causal_doc_mask(q_BHSD.shape[2], k_BHSD.shape[2], doc, q_BHSD.device)
            return attention_naive(q_BHSD, k_BHSD, v_BHSD, mask, self.scale)
        if backend == "flash":
            return self._flash(q_BHSD, k_BHSD, v_BHSD, doc)
        if q_BHSD.shape[2] == k_BHSD.shape[2]:  # packed documents: query chunks, never an S x S mask
            return causal_attention(q_BHSD, k_BHSD, v_BHSD, self.scale, doc)
        mask = causal_doc_mask(q_BHSD.shape[2], k_BHSD.shape[2], doc)
        return F.scaled_dot_product_attention(
            q_BHSD, k_BHSD, v_BHSD, attn_mask=mask, scale=self.scale, enable_gqa=True
        )

    def _flash(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, doc: torch.Tensor | None
    ) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # GPU-only optional dependency

        B, H, S, D = q_BHSD.shape
        if doc is not None and k_BHSD.shape[2] != S:
            raise ValueError("packed documents are not supported while decoding")
        q, k, v = (t.transpose(1, 2) for t in (q_BHSD, k_BHSD, v_BHSD))  # (B, S, H, D)
        if doc is None:  # flash-attn aligns causal masks bottom-right, as decoding needs
            o = flash_attn_func(q, k, v, softmax_scale=self.scale, causal=True)
            return o.transpose(1, 2)
        cu, max_len = _doc_cu_seqlens(doc)
        o = flash_attn_varlen_func(
            q.reshape(B * S, H, D),
            k.reshape(B * S, -1, D),
            v.reshape(B * S, -1, D),
            cu, cu, max_len, max_len,
            softmax_scale=self.scale,
            causal=True,
        )
        return o.reshape(B, S, H, D).transpose(1, 2)
