"""Softmax attention: reference (``naive``) implementation shared by every attention variant's tests."""

from longshard.kernels.attention.naive import attention_naive, causal_doc_mask

__all__ = ["attention_naive", "causal_doc_mask"]
