"""Block-sparse attention in Triton: forward and backward, one kernel for every per-head pattern.

Each (batch, query head, query block) reads its own CSR-style list of kept key blocks, so S2
strided shards, sink + sliding window and dense causal all run through the same kernels; masks
inside a block (causal diagonal, token-level window/sink, packed documents, ragged tail) are
applied per tile. FlashAttention-2 scheme: online softmax in fp32, log-sum-exp kept for the
backward (and returned, for ring merging); the backward recomputes probabilities from it.

* ``dQ`` kernel: one program per (query block, batch x head), walking the same list as the forward.
* ``dK/dV`` kernel: one program per (key block, batch x KV head), walking the transposed list of
  (query head of its GQA group, query block) pairs that read the block, so a group's heads are
  reduced inside the program (no atomics).

Block = the pattern's block (a power of two in 16..128); each program walks it in sub-tiles
(``LAUNCH``: keys per step in the forward and dQ, key rows per program and query rows per step in
dK/dV) so that D 128 and block 128 fit the registers. Offsets are 64-bit. Inputs of any float
dtype; fp16/bf16 tiles go to tensor cores with fp32 accumulation; fp32 inputs (and bf16 under the
CPU interpreter, whose bf16 ``tl.dot`` is wrong) are computed in fp32 (IEEE dot); fp16 takes the
tensor-core branch under the interpreter too, which is how that branch is tested on CPU.
"""

from __future__ import annotations

import math

import torch
from longshard.kernels.block_sparse.pattern import SparsePattern, kept_first
from longshard.kernels.triton_support import interpreting, next_pow2, require_triton, triton_installed

try:
    import triton
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

LOG2E = 1.4426950408889634
TRITON_BLOCKS = (16, 32, 64, 128)
MAX_ROWS = 128  # query rows per program (stacked GQA heads x block): bounds registers per program


def triton_block_ok(block: int) -> bool:
    """Whether ``block`` can be this kernel's tile size."""
    return block in TRITON_BLOCKS


def triton_runs(x: torch.Tensor, block: int) -> bool:
    """Whether ``auto`` paths run this kernel for ``x``: a CUDA tensor, Triton installed, ``block`` a tile."""
    return x.is_cuda and triton_installed() and triton_block_ok(block)


def block_csr(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept indices along the last dim, ascending and padded: ``(idx int32 (..., M), count int32 (...))``."""
    count = block_mask.sum(-1)
    m = max(int(count.max()) if count.numel() else 0, 1)
    idx = kept_first(block_mask, m)
    return idx.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def transposed_mask(block_mask_BHQN: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(Bi, Hkv, nK, G*nQ): for each KV head and key block, which (group head r, query block) read it."""
    Bi, H, nQ, nK = block_mask_BHQN.shape
    G = H // n_kv_heads
    return block_mask_BHQN.view(Bi, n_kv_heads, G, nQ, nK).permute(0, 1, 4, 2, 3).reshape(Bi, n_kv_heads, nK, G * nQ)


def group_shared(block_mask_BHQN: torch.Tensor, n_kv_heads: int, max_share: int) -> int:
    """How many query heads one program stacks: the largest power of two <= ``max_share`` dividing the
    GQA group size such that the heads of each stacked set have the same block lists (S2, dense, ...)."""
    Bi, H, nQ, nK = block_mask_BHQN.shape
    G = H // n_kv_heads
    share = 1
    while share * 2 <= max_share and G % (share * 2) == 0:
        share *= 2
    while share > 1:
        sets = block_mask_BHQN.view(Bi, H // share, share, nQ, nK)
        if bool((sets == sets[:, :, :1]).all()):
            return share
        share //= 2
    return 1


def csr_indices(block_mask_BHQN: torch.Tensor, n_blocks: int, n_kv_heads: int, block: int,
                causal: bool = True) -> tuple:
    """Forward (per query block) and backward (per key block) kept-block lists of a block mask (blocks
    above the diagonal dropped when ``causal``; a ring's fully visible chunk pair keeps them).

    Query heads of a GQA group that share their lists are stacked into one program (``share``
    heads, at most MAX_ROWS query rows per tile), so each K/V tile is loaded once for them.

    Returns:
        ``(share, idx, cnt, idx_t, cnt_t)``: ``idx`` (Bi, H / share, nQ, M) key blocks per (stacked)
        query block; ``idx_t`` (Bi, Hkv, nK, M') entries ``rr * nQ + query_block`` per key block, with
        rr the stacked head set inside the GQA group.
    """
    bm = block_mask_BHQN[..., :n_blocks, :n_blocks]
    if causal:
        bm = bm & torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=bm.device).tril()
    bm = bm.contiguous()
    share = group_shared(bm, n_kv_heads, max(MAX_ROWS // block, 1))
    bm = bm[:, ::share].contiguous()
    return (share, *block_csr(bm), *block_csr(transposed_mask(bm, n_kv_heads)))


if triton is not None:
    from longshard.kernels.block_sparse.triton_kernels import _bs_bwd_dkdv, _bs_bwd_dq, _bs_fwd

def _batch_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (Bi, H, R, M) index tensor; batch stride 0 when shared (Bi == 1)."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


# Launch settings per kernel, walked by tests/kernels/test_triton_compile.py (compiled for sm_80 and sm_90:
# shared memory within the device limit, <= 255 registers, no spills for the bf16/fp16 forward and
# dQ). Keyed by kernel and branch (tensor cores for fp16/bf16, IEEE fp32); each entry maps the head
# dim tile to (query rows BLOCK_M, keys BLOCK_N, num_warps, num_stages). Both sub-tiles are capped at
# the pattern's block: forward and dQ programs own BLOCK_M query rows (x stacked heads) and walk
# keys BLOCK_N at a time; dK/dV programs own BLOCK_N keys and walk queries BLOCK_M rows at a time.
LAUNCH = {
    ("fwd", "tc"): {64: (64, 64, 8, 2), 128: (64, 64, 8, 2), 256: (32, 32, 8, 1)},
    ("dq", "tc"): {64: (64, 64, 8, 2), 128: (64, 32, 8, 2), 256: (32, 16, 8, 1)},
    ("dkdv", "tc"): {64: (64, 32, 8, 2), 128: (64, 32, 8, 2), 256: (32, 16, 8, 1)},
    ("fwd", "fp32"): {64: (16, 32, 4, 1), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ("dq", "fp32"): {64: (16, 32, 4, 1), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
    ("dkdv", "fp32"): {64: (32, 16, 4, 1), 128: (16, 16, 4, 1), 256: (16, 16, 4, 1)},
}


def _ieee_branch(dtype: torch.dtype) -> bool:
    """fp32 inputs take the IEEE fp32 branch; so does bf16 under the interpreter (its bf16 ``tl.dot``
    is wrong). fp16 runs the tensor-core branch everywhere, so the interpreter tests that branch."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


def launch_settings(kernel: str, block: int, share: int, block_d: int, f32: bool) -> dict:
    """``num_warps``, ``num_stages`` and the sub-tile constexprs (``BLOCK_M``, ``BLOCK_N``) of one launch.

    Args:
        kernel: ``fwd``, ``dq`` or ``dkdv``.
        block: the pattern's block (the kernel's block granularity).
        share: stacked query heads per program (see :func:`group_shared`): rows = share x BLOCK_M.
        block_d: head dim tile (power of two).
        f32: the IEEE fp32 branch (fp32 inputs, or bf16 under the interpreter) instead of tensor cores.
    """
    block_m, block_n, warps, stages = LAUNCH[(kernel, "fp32" if f32 else "tc")][max(64, block_d)]
    block_m, block_n = min(block_m, block), min(block_n, block)
    # stacked heads multiply the query rows of a tile: keep share x BLOCK_M within MAX_ROWS / 2
    block_m = max(min(block_m, MAX_ROWS // 2 // share), min(16, block))
    rows = max(share * block_m, block_n)
    if rows * block_d < 64 * 128:  # a small tile: 4 warps (8 would idle, and lower the register cap)
        warps = 4
    return {"num_warps": warps, "num_stages": stages, "BLOCK_M": block_m, "BLOCK_N": block_n}


def _int_args(q: torch.Tensor, window_H, sink_H, doc_q_BS, doc_k_BS, select) -> tuple:
    """Device-side int32 window, sink, query/key document ids and selections (1-element dummies when absent)."""
    dummy = q.new_zeros(1, dtype=torch.int32)  # on the device: no host-to-device copy per launch
    as_int = lambda t: dummy if t is None else t.to(q.device, torch.int32).contiguous()
    win = as_int(window_H)
    sink = q.new_zeros(q.shape[1], dtype=torch.int32) if sink_H is None and window_H is not None else as_int(sink_H)
    doc_q = doc_q_BS.to(torch.int32).contiguous() if doc_q_BS is not None else dummy
    doc_k = doc_k_BS.to(torch.int32).contiguous() if doc_k_BS is not None else doc_q
    sel = select if select is not None else dummy
    return win, sink, doc_q, doc_k, sel


def _bias_arg(q: torch.Tensor, bias_BKS: torch.Tensor | None) -> torch.Tensor:
    """The (B, Hkv, S) fp32 key bias on q's device, or a 1-element fp32 dummy."""
    if bias_BKS is None:
        return q.new_zeros(1, dtype=torch.float32)
    return bias_BKS.to(q.device, torch.float32).contiguous()


def triton_forward(q, k, v, csr, block: int, scale: float, *, window_H=None, sink_H=None, doc_q_BS=None,
                   doc_k_BS=None, select=None, q_shift: int = 0, bias_BKS=None,
                   out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the forward kernel (no autograd): ``(o_BHSD in q's dtype, lse_BHS fp32)``.

    Args:
        q, k, v: (B, H, S, D) / (B, Hkv, S, D) contiguous.
        csr: :func:`csr_indices` of the block mask (built with the same ``causal`` as ``q_shift`` implies).
        block, scale: kernel tile and softmax scale.
        window_H, sink_H, select: as :func:`block_sparse_attention_triton_mask`.
        doc_q_BS, doc_k_BS: document ids of the query and key rows (``doc_k_BS`` defaults to ``doc_q_BS``;
            the two differ when queries and keys are different chunks of a sequence, as in a ring).
        q_shift: query positions are this far ahead of the keys' (0: causal in one frame; >= S: every key
            visible to every query).
        bias_BKS: (B, Hkv, S) logit bias of every key (natural-log units, added to q.k * scale), or None.
        out_dtype: dtype of the output (default q's; fp32 for partial outputs that are merged later).
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    share, idx, cnt, _, _ = csr
    o = torch.empty_like(q, dtype=out_dtype)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    win, sink, doc_q, doc_k, sel = _int_args(q, window_H, sink_H, doc_q_BS, doc_k_BS, select)
    f32 = _ieee_branch(q.dtype)
    block_d = next_pow2(D)
    launch = launch_settings("fwd", block, share, block_d, f32)
    _bs_fwd[(math.ceil(S / block) * (block // launch["BLOCK_M"]), B * H // share)](
        q, k, v, o, lse, idx, cnt, win, sink, doc_q, doc_k, sel, _bias_arg(q, bias_BKS),
        *_batch_strides(idx), *_batch_strides(cnt[..., None])[:2], H, S, D, H // Hkv, Hkv, q_shift, scale * LOG2E,
        BLOCK=block, SHARE=share, BLOCK_D=block_d, HAS_WIN=window_H is not None, HAS_DOC=doc_q_BS is not None,
        F32=f32, N_SEL=sel.shape[-1] if select is not None else 1, HAS_SEL=select is not None,
        HAS_BIAS=bias_BKS is not None, **launch,
    )
    return o, lse


def triton_backward(do, q, k, v, lse, delta, csr, block: int, scale: float, *, window_H=None, sink_H=None,
                    doc_q_BS=None, doc_k_BS=None, select=None, q_shift: int = 0, bias_BKS=None,
                    grad_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """The backward kernels (no autograd) given the softmax statistics: ``(dq, dk, dv, dbias)``, the first
    three in the inputs' dtypes, ``dbias`` (B, Hkv, S) fp32 (None without ``bias_BKS``).

    Args:
        do: (B, H, S, D) output gradient, contiguous.
        lse, delta: (B, H, S) fp32 log-sum-exp and rowsum(dO * O) of the *whole* attention these keys are
            part of (a ring merges several key sets; each set's gradients come from the merged statistics).
        grad_dtype: dtype of the gradients (default the inputs'; fp32 for gradients summed over pairs).
        others: as :func:`triton_forward`.
    """
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    n = math.ceil(S / block)
    share, idx, cnt, idx_t, cnt_t = csr
    win, sink, doc_q, doc_k, sel = _int_args(q, window_H, sink_H, doc_q_BS, doc_k_BS, select)
    f32 = _ieee_branch(q.dtype)
    block_d = next_pow2(D)
    dq, dk, dv = (torch.empty_like(t, dtype=grad_dtype) for t in (q, k, v))
    bias = _bias_arg(q, bias_BKS)
    dbias = torch.empty_like(bias)
    flags = dict(BLOCK=block, SHARE=share, BLOCK_D=block_d, HAS_WIN=window_H is not None,
                 HAS_DOC=doc_q_BS is not None, F32=f32, N_SEL=sel.shape[-1] if select is not None else 1,
                 HAS_SEL=select is not None, HAS_BIAS=bias_BKS is not None)
    dq_launch = launch_settings("dq", block, share, block_d, f32)
    _bs_bwd_dq[(n * (block // dq_launch["BLOCK_M"]), B * H // share)](
        q, k, v, do, lse, delta, dq, idx, cnt, win, sink, doc_q, doc_k, sel, bias,
        *_batch_strides(idx), *_batch_strides(cnt[..., None])[:2], H, S, D, H // Hkv, Hkv, q_shift,
        scale * LOG2E, scale, **flags, **dq_launch,
    )
    kv_launch = launch_settings("dkdv", block, share, block_d, f32)
    _bs_bwd_dkdv[(n * (block // kv_launch["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, dbias, idx_t, cnt_t, win, sink, doc_q, doc_k, sel, bias,
        *_batch_strides(idx_t), *_batch_strides(cnt_t[..., None])[:2],
        H, S, D, H // Hkv, Hkv, n, q_shift, scale * LOG2E, scale, **flags, **kv_launch,
    )
    return dq, dk, dv, (dbias if bias_BKS is not None else None)


class _BlockSparseTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, csr, block, window_H, sink_H, doc_ids_BS, scale, select, bias):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        bias = None if bias is None else bias.detach().float().contiguous()
        o, lse = triton_forward(q, k, v, csr, block, scale, window_H=window_H, sink_H=sink_H, doc_q_BS=doc_ids_BS,
                                select=select, bias_BKS=bias)
        optional = (window_H, sink_H, doc_ids_BS, select, bias)
        ctx.save_for_backward(q, k, v, o, lse, *csr[1:], *[t for t in optional if t is not None])
        ctx.meta = (block, csr[0], scale, [t is not None for t in optional])
        return o, lse

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse, idx, cnt, idx_t, cnt_t, *rest = ctx.saved_tensors
        block, share, scale, present = ctx.meta
        window_H, sink_H, doc_ids_BS, select, bias = [rest.pop(0) if p else None for p in present]
        do = grad_o.contiguous()
        delta = (o.float() * do.float()).sum(-1).contiguous()  # (B, H, S)
        if grad_lse is not None:  # d lse / d s = p: folds into delta with the opposite sign
            delta = (delta - grad_lse.float()).contiguous()
        dq, dk, dv, dbias = triton_backward(do, q, k, v, lse, delta, (share, idx, cnt, idx_t, cnt_t), block, scale,
                                            window_H=window_H, sink_H=sink_H, doc_q_BS=doc_ids_BS, select=select,
                                            bias_BKS=bias)
        return dq, dk, dv, None, None, None, None, None, None, None, dbias


def block_sparse_attention_triton_mask(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    block_mask_BHQN: torch.Tensor,
    block: int,
    window_H: torch.Tensor | None = None,
    sink_H: torch.Tensor | None = None,
    doc_ids_BS: torch.Tensor | None = None,
    scale: float | None = None,
    csr: tuple[torch.Tensor, ...] | None = None,
    select_BKSN: torch.Tensor | None = None,
    bias_BKS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention (Sq == Sk) from a block mask that may differ per batch element.

    Args:
        q_BHSD: (B, H, S, D) queries.
        k_BHSD, v_BHSD: (B, Hkv, S, D) keys/values, H a multiple of Hkv.
        block_mask_BHQN: (1 or B, H, nQ, nK) bool kept key blocks per query block (upper blocks ignored).
        block: block size = kernel tile (16, 32, 64 or 128).
        window_H, sink_H: (H,) token-level sliding window / sink sizes (0 = no window), or None.
        doc_ids_BS: (B, S) document ids of packed sequences, or None.
        scale: softmax scale (default 1/sqrt(D)).
        csr: precomputed :func:`csr_indices` of this mask, shape and KV-head count (a cache), or None.
        select_BKSN: (B, Hkv, S, n) key blocks each query token selected for its KV group (-1 = none;
            NSA-style selection): a token reads a kept block only if it selected it. The block mask
            must contain, per query block, the union of its tokens' selections (see
            :func:`selection_block_mask`).
        bias_BKS: (B, Hkv, S) logit bias of each key (added to q.k * scale; DMA's value-derived mask),
            differentiable (its gradient: the sum over the reading rows of dS), or None.

    Returns:
        ``(o_BHSD, lse_BHS)``: output in the input dtype and the natural-log log-sum-exp (fp32,
        -inf for rows with no kept key), both differentiable.
    """
    require_triton(q_BHSD, "block-sparse Triton attention")
    if not triton_block_ok(block):
        raise ValueError(f"Triton block-sparse tile must be one of {TRITON_BLOCKS}, got block={block}")
    if k_BHSD.shape[2] != q_BHSD.shape[2]:
        raise ValueError("the Triton block-sparse kernel needs as many queries as keys (training / prefill)")
    H, Hkv = q_BHSD.shape[1], k_BHSD.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if k_BHSD.shape[-1] != v_BHSD.shape[-1]:
        raise ValueError("the Triton block-sparse kernel needs equal key and value head dims")
    if block_mask_BHQN.dim() == 3:
        block_mask_BHQN = block_mask_BHQN[None]
    scale = 1.0 / math.sqrt(q_BHSD.shape[-1]) if scale is None else scale
    if csr is None:
        csr = csr_indices(block_mask_BHQN.to(q_BHSD.device), math.ceil(q_BHSD.shape[2] / block), Hkv, block)
    if select_BKSN is not None:  # pad the per-token lists to a power of two (tl.arange) with -1
        n_sel = select_BKSN.shape[-1]
        width = max(triton.next_power_of_2(n_sel), 2) if triton is not None else n_sel
        select_BKSN = torch.nn.functional.pad(select_BKSN.to(torch.int32), (0, width - n_sel), value=-1).contiguous()
    return _BlockSparseTriton.apply(q_BHSD, k_BHSD, v_BHSD, csr, block,
                                    window_H, sink_H, doc_ids_BS, scale, select_BKSN, bias_BKS)


def selection_block_mask(select_BKSN: torch.Tensor, n_heads: int, block: int, n_blocks: int) -> torch.Tensor:
    """(B, H, nQ, nK) block mask = per query block, the union of its tokens' selected key blocks.

    Args:
        select_BKSN: (B, Hkv, S, n) selected key-block indices per token (-1 = none).
        n_heads: query heads H (each KV group's union is repeated over its heads).
        block: query block size (the kernel tile).
        n_blocks: number of key blocks.
    """
    B, Hkv, S, n = select_BKSN.shape
    nq = math.ceil(S / block)
    qb = (torch.arange(S, device=select_BKSN.device) // block)[None, None, :, None]
    valid = select_BKSN >= 0
    flat = torch.where(valid, qb * (n_blocks + 1) + select_BKSN, qb * (n_blocks + 1) + n_blocks)  # spare column
    mask = torch.zeros(B, Hkv, nq * (n_blocks + 1), dtype=torch.bool, device=select_BKSN.device)
    mask.scatter_(2, flat.reshape(B, Hkv, -1), True)
    mask = mask.view(B, Hkv, nq, n_blocks + 1)[..., :n_blocks]
    return mask.repeat_interleave(n_heads // Hkv, dim=1)


def block_sparse_attention_triton(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    pattern: SparsePattern,
    doc_ids_BS: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with a :class:`SparsePattern` (Sq == Sk), Triton forward and backward.

    Args: as :func:`longshard.kernels.block_sparse.naive.block_sparse_attention_naive`, plus
        ``return_lse`` to also return the (B, H, S) log-sum-exp for merging partial results.
    """
    n, n_kv = math.ceil(q_BHSD.shape[2] / pattern.block), k_BHSD.shape[1]
    key = ("triton_csr", n, n_kv, str(q_BHSD.device))
    if key not in pattern.cache:  # patterns are cached per layer: build the block lists once
        pattern.cache[key] = csr_indices(pattern.block_mask_HQN.to(q_BHSD.device)[None], n, n_kv, pattern.block)
    o, lse = block_sparse_attention_triton_mask(
        q_BHSD, k_BHSD, v_BHSD, pattern.block_mask_HQN, pattern.block, pattern.window_H, pattern.sink_H,
        doc_ids_BS, scale, csr=pattern.cache[key],
    )
    return (o, lse) if return_lse else o
