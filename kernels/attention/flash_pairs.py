"""Ring steps through flash-attn's own forward and backward with the log-sum-exp, as ring-flash-attn runs them.

flash-attn's ``_flash_attn_forward`` returns a pair's output and log-sum-exp; its ``_flash_attn_backward``
takes the *merged* output and log-sum-exp of the whole attention (it forms ``rowsum(dO * O)`` itself),
so each ring step's gradients are exact, the same contract as :mod:`longshard.kernels.attention.pairs`.
flash-attn runs fp16/bf16 on CUDA without per-token masks; pairs with packed documents, fp32 inputs or a
head dim it does not take go to the fallback backend (the Triton pair kernel), chosen per pair, so one
ring can mix both (each pair's result is exact either way).

The internal functions' signatures changed across flash-attn releases (2.6 split ``window_size`` into
left/right and returns 4 values instead of 8); the arguments are matched by name.
Shape letters: B batch, H query heads, K key/value heads, Q query rows, N key rows, D head dim.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from types import ModuleType

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_installed() -> bool:
    """True when the flash-attn package can be imported (its CUDA kernels need a GPU to run)."""
    return importlib.util.find_spec("flash_attn") is not None


class FlashAttnPairs:
    """Chunk pairs through flash-attn (forward with the log-sum-exp, backward from the merged statistics).

    Args:
        scale: softmax scale.
        fallback: the backend for the pairs flash-attn cannot take (documents, fp32, odd head dims).
        interface: the module with ``_flash_attn_forward`` / ``_flash_attn_backward`` (default:
            ``flash_attn.flash_attn_interface``; tests pass a stand-in).
    """

    name = "flash_attn"

    def __init__(self, scale: float, fallback, interface: ModuleType | None = None) -> None:
        self.fa = interface or importlib.import_module("flash_attn.flash_attn_interface")
        self.scale, self.fallback = scale, fallback
        self._fwd_args = set(inspect.signature(self.fa._flash_attn_forward).parameters)
        self._bwd_args = set(inspect.signature(self.fa._flash_attn_backward).parameters)

    @staticmethod
    def takes(q_BHQD: torch.Tensor, doc_q_BQ: torch.Tensor | None) -> bool:
        """Whether flash-attn computes this pair: fp16/bf16, no packed documents, head dim 8..256 by 8."""
        D = q_BHQD.shape[-1]
        return doc_q_BQ is None and q_BHQD.dtype in FLASH_DTYPES and D % 8 == 0 and D <= 256

    def _options(self, names: set[str], causal: bool) -> dict:
        every = {"dropout_p": 0.0, "softmax_scale": self.scale, "causal": causal, "window_size": (-1, -1),
                 "window_size_left": -1, "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None,
                 "return_softmax": False, "deterministic": False, "rng_state": None}
        return {k: v for k, v in every.items() if k in names}

    def forward(self, q_BHQD, k_BKND, v_BKND, causal: bool, doc_q_BQ=None, doc_k_BN=None):
        """``(o_BHQD fp32, lse_BHQ fp32)`` of the pair."""
        if not self.takes(q_BHQD, doc_q_BQ):
            return self.fallback.forward(q_BHQD, k_BKND, v_BKND, causal, doc_q_BQ, doc_k_BN)
        q, k, v = (t.transpose(1, 2) for t in (q_BHQD, k_BKND, v_BKND))  # flash layout (B, S, heads, D)
        res = self.fa._flash_attn_forward(q, k.to(q.dtype), v.to(q.dtype), **self._options(self._fwd_args, causal))
        o_BQHD, lse_BHQ = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])  # >= 2.6: 4 values, else 8
        return o_BQHD.transpose(1, 2).float(), lse_BHQ.float()

    def backward(self, do_BHQD, q_BHQD, k_BKND, v_BKND, o_BHQD, lse_BHQ, delta_BHQ, causal: bool,
                 doc_q_BQ=None, doc_k_BN=None):
        """``(dq, dk, dv)`` of the pair in fp32 from the merged output and log-sum-exp (flash-attn forms
        ``rowsum(dO * O)`` from that output itself: ``delta_BHQ`` is then not needed)."""
        if not self.takes(q_BHQD, doc_q_BQ):
            return self.fallback.backward(do_BHQD, q_BHQD, k_BKND, v_BKND, o_BHQD, lse_BHQ, delta_BHQ, causal,
                                          doc_q_BQ, doc_k_BN)
        dt = q_BHQD.dtype
        q, k, v = (t.to(dt).transpose(1, 2) for t in (q_BHQD, k_BKND, v_BKND))
        do, o = do_BHQD.to(dt).transpose(1, 2).contiguous(), o_BHQD.to(dt).transpose(1, 2).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self.fa._flash_attn_backward(do, q, k, v, o, lse_BHQ.float().contiguous(), dq, dk, dv,
                                     **self._options(self._bwd_args, causal))
        return tuple(g.transpose(1, 2).float() for g in (dq, dk, dv))
