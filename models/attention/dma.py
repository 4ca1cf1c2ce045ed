"""Dynamic Mask Attention (DMA; "Trainable Dynamic Mask Sparse Attention").

A content-aware mask from the values: per KV head, every key j gets the logit bias
``A_h * softplus(Delta_h . v_j)``; each query block keeps its own block and the ``keep_blocks - 1``
earlier key blocks of highest mean detached bias, and attends softmax(q.k * scale + bias) over those
keys. A, Delta and the values train through the kept keys' bias; the top-k passes no gradient. See
:mod:`longshard.kernels.dma`. The selection of a head needs all of its keys: Ulysses, not the ring.

The published form (flash-dmattn, transformers' ``DogeAttention``) is three options away:
``dt_proj: full`` (one ``Linear(K*D -> K)`` over every KV head's values, ``dt_bias`` for its bias),
``bias_fn: exp_a_softplus`` and ``keep_own_block: false`` with ``block: 1`` (each query's top
``keep_blocks`` keys, its own only when it ranks); :meth:`DMAAttention.load_reference_weights` takes a
Doge attention's ``A`` / ``dt_proj.weight`` / ``dt_proj.bias`` by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from longshard.errors import require, require_positive
from longshard.kernels.block_sparse.triton import TRITON_BLOCKS, triton_block_ok, triton_runs
from longshard.kernels.dma import dma_attention_gather, dma_attention_naive, dma_attention_triton, dma_kept_fraction
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    dense_attention_flops,
    register_attention,
)
from torch import nn


@dataclass(kw_only=True)
class DMAOptions(AttentionOptions):
    """Options of ``dma``.

    Args:
        block: tokens per block (the unit the top-w selection is rounded to).
        keep_blocks: key blocks each query block reads, its own included (w = keep_blocks x block keys).
        a_init: initial A of every KV head. 0 (the default) starts with no bias, so a converted dense
            checkpoint differs only by the keys it no longer reads; A then trains.
        delta_std: standard deviation of Delta's initial values.
        dt_proj: ``per_head`` (longshard's: Delta_h . v over KV head h's own values, no bias) or ``full`` (the
            reference's ``Linear(K*D -> K)`` over every KV head's values; not on a slice of the heads).
        dt_bias: give the ``full`` projection its bias (the reference's ``attention_bias``).
        bias_fn: ``a_softplus`` (longshard's ``A softplus(dt)``) or ``exp_a_softplus`` (the reference's
            ``exp(A softplus(dt))``; with A = 0 every key gets 1, which softmax ignores).
        keep_own_block: True (longshard's rule): each query block keeps its own block and ranks the earlier
            ones; False needs ``block: 1``: each query keeps its top ``keep_blocks`` keys among all it may
            see, its own key only when it ranks (the reference's top-w; the selection costs S x S).
        path: ``auto`` (``triton`` on CUDA when ``block`` is a Triton tile, else ``gather``), ``triton``
            (the block-sparse CSR kernels with the bias as a per-key logit term), ``gather`` (PyTorch's
            flash attention with the bias as one more query/key coordinate, kept key blocks gathered per
            query block) or ``naive`` (the full-matrix reference).
    """

    block: int = 64
    keep_blocks: int = 8
    a_init: float = 0.0
    delta_std: float = 0.02
    path: str = "auto"
    dt_proj: str = "per_head"
    dt_bias: bool = False
    bias_fn: str = "a_softplus"
    keep_own_block: bool = True

    def __post_init__(self) -> None:
        require_positive(self.block, "block")
        require(self.dt_proj in ("per_head", "full"), "dt_proj", f"unknown dt_proj {self.dt_proj!r}.",
                "use per_head or full.")
        require(not self.dt_bias or self.dt_proj == "full", "dt_bias", "only the full dt_proj has a bias.",
                "set dt_proj: full or dt_bias: false.")
        require(self.bias_fn in ("a_softplus", "exp_a_softplus"), "bias_fn", f"unknown bias_fn {self.bias_fn!r}.",
                "use a_softplus or exp_a_softplus.")
        require(self.keep_own_block or self.block == 1, "keep_own_block",
                f"false ranks a query's own key among the others, which needs block: 1 (got {self.block}).",
                "set block: 1 or keep_own_block: true.")
        require_positive(self.keep_blocks, "keep_blocks")
        require(self.delta_std >= 0, "delta_std", f"must be >= 0, got {self.delta_std}.")
        require(self.path in ("auto", "triton", "gather", "naive"), "path", f"unknown path {self.path!r}.",
                "use auto, triton, gather or naive.")
        require(self.path != "triton" or triton_block_ok(self.block), "block",
                f"path=triton needs block in {TRITON_BLOCKS}, got {self.block}.", "change block or use path=gather.")

    def tensor_parallel_problem(self) -> str | None:
        return "dma has per-KV-head parameters (A, Delta)"

    def head_parallel_problem(self) -> str | None:
        if self.dt_proj == "full":
            return "dma with dt_proj: full computes each head's bias from every KV head's values"
        return None


@register_attention("dma", DMAOptions)
class DMAAttention(CoreAttention):
    """Dynamic Mask Attention: value-derived key bias, top blocks per query block by that bias."""

    covers_context = False  # the kept blocks are a budget, not a cover

    def __init__(self, ctx: AttentionContext, opts: DMAOptions) -> None:
        super().__init__(ctx, opts)
        self.scale = 1.0 / math.sqrt(ctx.head_dim)
        K = ctx.n_kv_heads
        self.a = nn.Parameter(torch.empty(K))
        self.delta = nn.Parameter(torch.empty(K, ctx.head_dim * (K if opts.dt_proj == "full" else 1)))
        self.dt_bias = nn.Parameter(torch.empty(K)) if opts.dt_bias else None
        self.kv_slice: tuple[int, int] | None = None
        self.reset_variant_parameters()

    @torch.no_grad()
    def reset_variant_parameters(self) -> None:
        """A = a_init, Delta ~ N(0, delta_std^2), the full projection's bias 0."""
        self.a.fill_(self.opts.a_init)
        self.delta.normal_(0.0, self.opts.delta_std)
        if self.dt_bias is not None:
            self.dt_bias.zero_()

    @torch.no_grad()
    def load_reference_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Take a reference DMA attention's bias parameters by their names there (transformers'
        ``DogeAttention``: ``A``, ``dt_proj.weight``, ``dt_proj.bias``; other keys are ignored).

        Args:
            state: that module's state dict (or the part of a checkpoint under its prefix).
        """
        want = {"A": self.a, "dt_proj.weight": self.delta}
        if self.dt_bias is not None:
            want["dt_proj.bias"] = self.dt_bias
        elif "dt_proj.bias" in state:
            raise ValueError("the reference has a dt_proj bias: build this layer with dt_proj: full, dt_bias: true")
        for name, param in want.items():
            if name not in state:
                raise ValueError(f"reference weights: {name!r} missing (have {sorted(state)})")
            if tuple(state[name].shape) != tuple(param.shape):
                fix = " (use dt_proj: full)" if name == "dt_proj.weight" else ""
                raise ValueError(f"reference weights: {name!r} is {tuple(state[name].shape)}, this layer's "
                                 f"{tuple(param.shape)}{fix}")
            param.copy_(state[name])

    def set_head_slice(self, start: int, stop: int) -> None:
        """Run query heads [start, stop) (Ulysses): the A and Delta of their KV heads are used. The bias and
        the selection depend on a KV head's values only, so a slice may hold part of a GQA group (Ulysses
        then replicates its KV head)."""
        if self.opts.dt_proj == "full":
            raise ValueError(self.opts.head_parallel_problem())
        G = self.ctx.n_heads // self.ctx.n_kv_heads
        self.kv_slice = (start // G, -(-stop // G))

    def resolve_path(self, q_BHSD: torch.Tensor) -> str:
        """The path ``auto`` stands for on this input: Triton on CUDA where it can run, else gather."""
        if self.opts.path != "auto":
            return self.opts.path
        return "triton" if triton_runs(q_BHSD, self.opts.block) and self.opts.keep_own_block else "gather"

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        fn = {"naive": dma_attention_naive, "gather": dma_attention_gather,
              "triton": dma_attention_triton}[self.resolve_path(q_BHSD)]
        a, delta = self.a, self.delta
        if self.kv_slice is not None:
            a, delta = a[self.kv_slice[0] : self.kv_slice[1]], delta[self.kv_slice[0] : self.kv_slice[1]]
        return fn(q_BHSD, k_BHSD, v_BHSD, a, delta, self.opts.block, self.opts.keep_blocks, self.scale,
                  batch.doc_ids_BS, dt_bias_K=self.dt_bias, exp_bias=self.opts.bias_fn == "exp_a_softplus",
                  keep_own=self.opts.keep_own_block)

    def kept_fraction(self, seq_len: int) -> float:
        return dma_kept_fraction(seq_len, self.opts.block, self.opts.keep_blocks)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """The keys each query reads (its kept blocks), plus the bias: one D-dot per key and head."""
        keys = self.kept_fraction(seq_len) * (seq_len + 1) / 2
        bias = 2.0 * self.ctx.n_kv_heads * self.ctx.head_dim
        return dense_attention_flops(self.ctx.n_heads, self.ctx.head_dim, seq_len, keys) + bias
