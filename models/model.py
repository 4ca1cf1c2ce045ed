"""Llama/Qwen-style decoder-only transformer. Single-device code: parallelism is applied from outside."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from longshard.models.attention import AttentionBatch, AttentionContext, CoreAttention, build_attention
from longshard.models.attention.registry import append_kv
from longshard.models.config import ModelConfig
from longshard.models.rope import RotaryEmbedding, apply_rope
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
AC_MODES = ("none", "full", "attention_boundary")
LOSS_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one loss chunk (auto chunk size)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32.

    Args:
        dim: normalised width.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(x.dtype)).to(x.dtype)  # fp32 weight must not promote a bf16 input


class InferenceCache:
    """Decoding state of a model: past keys/values (or recurrent state) per layer.

    Create one per generated batch and pass it to every forward call; positions continue from
    the number of tokens already seen.
    """

    def __init__(self) -> None:
        self.slots: dict[int, dict[str, Any]] = {}
        self.seen = 0

    def slot(self, layer_idx: int) -> dict[str, Any]:
        return self.slots.setdefault(layer_idx, {})

    def attend(
        self, layer_idx: int, core: nn.Module, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """Run layer ``layer_idx``'s core attention for new positions, keeping its decoding state here.

        This cache keeps every past key/value on the compute device (subclasses, e.g.
        :class:`longshard.models.offload.OffloadedCache`, keep them elsewhere).
        """
        slot = self.slot(layer_idx)
        if core.uses_kv_cache:
            k_BHSD, v_BHSD = append_kv(slot, k_BHSD, v_BHSD)
        else:
            batch = replace(batch, cache_slot=slot)
        return core(q_BHSD, k_BHSD, v_BHSD, batch)


class Attention(nn.Module):
    """Projections, QK-norm, RoPE and the optional output gate around a registry-chosen core attention.

    Args:
        cfg: model config.
        layer_idx: index of this layer.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        # the heads this module computes: all of them, until tensor parallel gives it a range (set_head_range)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_query_heads, cfg.n_kv_heads, cfg.head_dim
        self.head_offset = 0  # global index of the first of them
        hd = self.head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * hd, cfg.dim, bias=cfg.o_bias)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        spec = cfg.layer_attention(layer_idx)
        self.gate_kind = spec.gate
        gate_out = gate_width(spec.gate, self.n_heads, hd)
        self.wg = nn.Linear(cfg.dim, gate_out, bias=False) if gate_out else None
        ctx = AttentionContext(
            layer_idx=layer_idx,
            n_layers=cfg.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=hd,
            model_dim=cfg.dim,
        )
        self.ctx = ctx  # the core's context, also when parallel wrappers replace core_attention
        self.core_attention = build_attention(spec.name, spec.options, ctx)
        self.activation_offload = None  # an ActivationOffload shared by the model's layers, set by the model

    def set_head_range(self, start: int, stop: int) -> None:
        """Compute query heads [start, stop) of the layer's heads (and their share of the KV heads) from
        now on: tensor parallel calls this after splitting the projections. Sequence parallel slices
        further inside this range (``head_offset``)."""
        G = self.ctx.n_heads // self.ctx.n_kv_heads
        if start % G or stop % G:
            raise ValueError(f"heads [{start}, {stop}) split a GQA group of {G}")
        self.core_attention.set_head_slice(start, stop)
        self.head_offset, self.n_heads, self.n_kv_heads = start, stop - start, (stop - start) // G

    def core(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        """The core attention, with its saved activations in host memory when offload is on and training."""
        if self.activation_offload is not None and torch.is_grad_enabled():
            with self.activation_offload.region(k_BHSD, v_BHSD):
                return self.core_attention(q_BHSD, k_BHSD, v_BHSD, batch)
        return self.core_attention(q_BHSD, k_BHSD, v_BHSD, batch)

    def project(
        self, x_BSE: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, H, S, D) / (B, Hkv, S, D): projections, QK-norm, RoPE."""
        B, S, _ = x_BSE.shape
        q_BSHD = self.wq(x_BSE).view(B, S, self.n_heads, self.head_dim)
        k_BSHD = self.wk(x_BSE).view(B, S, self.n_kv_heads, self.head_dim)
        v_BSHD = self.wv(x_BSE).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_BSHD, k_BSHD = self.q_norm(q_BSHD), self.k_norm(k_BSHD)
        q_BHSD = apply_rope(q_BSHD.transpose(1, 2), cos_BSD, sin_BSD)
        k_BHSD = apply_rope(k_BSHD.transpose(1, 2), cos_BSD, sin_BSD)
        return q_BHSD, k_BHSD, v_BSHD.transpose(1, 2)

    def output(self, o_BHSD: torch.Tensor, x_BSE: torch.Tensor) -> torch.Tensor:
        """Optional sigmoid output gate from the layer input (Gated Attention, G1), then wo."""
        B, S, _ = x_BSE.shape
        if self.wg is not None:
            o_BHSD = apply_output_gate(o_BHSD, x_BSE, self.wg)
        return self.wo(o_BHSD.transpose(1, 2).reshape(B, S, -1))

    def forward(
        self,
        x_BSE: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        batch: AttentionBatch,
        cache: InferenceCache | None = None,
    ) -> torch.Tensor:
        q_BHSD, k_BHSD, v_BHSD = self.project(x_BSE, cos_BSD, sin_BSD)
        batch = replace(batch, x_BSE=x_BSE)
        if cache is not None:
            o_BHSD = cache.attend(self.layer_idx, self.core_attention, q_BHSD, k_BHSD, v_BHSD, batch)
        else:
            o_BHSD = self.core(q_BHSD, k_BHSD, v_BHSD, batch)
        return self.output(o_BHSD, x_BSE)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def apply_output_gate(o_BHSD: torch.Tensor, x_BSE: torch.Tensor, wg: nn.Linear) -> torch.Tensor:
    """Gated Attention's G1 gate: ``o * sigmoid(wg(x))`` per head (``wg`` gives H values) or per channel
    (H x D values), the sigmoid in fp32.

    Args:
        o_BHSD: attention output of the H heads.
        x_BSE: the layer input the gate is computed from.
        wg: the gate projection.
    """
    B, S, _ = x_BSE.shape
    g = torch.sigmoid(wg(x_BSE).float()).to(o_BHSD.dtype)
    g_BHSX = g.view(B, S, o_BHSD.shape[1], -1).transpose(1, 2)  # X = 1 (headwise) or D (elementwise)
    return o_BHSD * g_BHSX


def gate_width(kind: str, n_heads: int, head_dim: int) -> int:
    """Outputs of the gate projection of a ``kind`` gate (``none``: 0, ``headwise``: H, ``elementwise``: H x D)."""
    return {"none": 0, "headwise": n_heads, "elementwise": n_heads * head_dim}[kind]


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)

    def forward(
        self,
        x_BSE: torch.Tensor,
        cos_BSD: torch.Tensor,
        sin_BSD: torch.Tensor,
        batch: AttentionBatch,
        cache: InferenceCache | None = None,
        attention_boundary: bool = False,
    ) -> torch.Tensor:
        """One block; ``attention_boundary`` selects :meth:`forward_attention_boundary` (through
        ``__call__``, so wrappers such as FSDP2 see the call and gather the block's parameters)."""
        if attention_boundary:
            return self.forward_attention_boundary(x_BSE, cos_BSD, sin_BSD, batch)
        h = x_BSE + self.attention(self.attention_norm(x_BSE), cos_BSD, sin_BSD, batch, cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def _pre_attention(self, x_BSE, cos_BSD, sin_BSD):
        xn = self.attention_norm(x_BSE)
        return (*self.attention.project(xn, cos_BSD, sin_BSD), xn)

    def _post_attention(self, o_BHSD, x_BSE):
        h = x_BSE + self.attention.output(o_BHSD, self.attention_norm(x_BSE))
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_attention_boundary(
        self, x_BSE: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """Rematerialisation-aware checkpointing (LightSeq): everything but the core attention is
        recomputed in backward; the core attention's output (and what it saved) is kept, so a
        distributed attention forward never runs twice."""
        q, k, v, xn = checkpoint(self._pre_attention, x_BSE, cos_BSD, sin_BSD, use_reentrant=False)
        o = self.attention.core(q, k, v, replace(batch, x_BSE=xn))
        return checkpoint(self._post_attention, o, x_BSE, use_reentrant=False)


def layer_aux_losses(layers) -> dict[int, torch.Tensor]:
    """The auxiliary loss each of ``layers`` recorded in the last forward (summed over its core attentions),
    by layer index; cleared on reading."""
    out: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        found = [m.pop_aux_loss() for m in layer.modules() if isinstance(m, CoreAttention)]
        found = [v for v in found if v is not None]
        if found:
            out[i] = torch.stack(found).sum()
    return out


def positions_from_docs(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document start.

    Args:
        doc_ids_BS: (B, S) non-decreasing document index per token.
    """
    S = doc_ids_BS.shape[1]
    idx = torch.arange(S, device=doc_ids_BS.device).expand_as(doc_ids_BS)
    starts = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_idx, dim=1).values


class Transformer(nn.Module):
    """Decoder-only language model.

    Args:
        cfg: validated :class:`ModelConfig`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.activation_checkpointing = "none"
        self.activation_offload = None
        self.loss_chunk_tokens: int | None = 0  # 0 = auto (LOSS_CHUNK_BYTES of fp32 logits), None = one pass
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms; output layers scaled by depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=std / (2 * self.cfg.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)
        for m in self.modules():  # variant parameters with a meaningful initialisation of their own
            if isinstance(m, CoreAttention):
                m.reset_variant_parameters()
        self.rope.reset_parameters()

    def aux_losses(self) -> dict[int, torch.Tensor]:
        """Auxiliary loss of each layer that recorded one in the last forward (a learned-gate L1 penalty,
        MoH's load balance), by layer index; cleared on reading.

        Attention modules set ``last_aux_loss`` during their forward (so the parameters it uses
        are materialised even under FSDP2); the trainer adds their sum to the language-model loss.
        """
        return layer_aux_losses(self.layers)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of :meth:`aux_losses` (None when no layer recorded one), then cleared."""
        found = list(self.aux_losses().values())
        return torch.stack(found).sum() if found else None

    def set_activation_checkpointing(self, mode: str) -> None:
        """``none``, ``full`` (recompute each block in backward) or ``attention_boundary``
        (recompute all but the core attention: no distributed attention is ever recomputed)."""
        if mode not in AC_MODES:
            raise ValueError(f"activation checkpointing mode {mode!r}: use one of {AC_MODES}")
        self.activation_checkpointing = mode

    def set_loss_chunking(self, chunk_tokens: int | None) -> None:
        """How the loss head (``forward(..., labels_BS=...)``) splits the tokens: ``0`` = auto (fp32
        logits of one chunk <= 256 MB), ``n > 0`` = n tokens per chunk, ``None`` = all logits at once."""
        if chunk_tokens is not None and chunk_tokens < 0:
            raise ValueError(f"loss chunk of {chunk_tokens} tokens: use 0 (auto), a positive count or None")
        self.loss_chunk_tokens = chunk_tokens

    def set_activation_offload(self, mode: str) -> None:
        """``none``, ``kv`` (saved keys/values of every core attention in host memory) or ``attention``
        (everything the core attentions save); see :class:`longshard.models.activation_offload.ActivationOffload`."""
        from longshard.models.activation_offload import ActivationOffload

        self.activation_offload = None if mode == "none" else ActivationOffload(mode)
        for layer in self.layers:
            layer.attention.activation_offload = self.activation_offload

    def forward(
        self,
        tokens_BS: torch.Tensor,
        *,
        position_ids_BS: torch.Tensor | None = None,
        doc_ids_BS: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
        labels_BS: torch.Tensor | None = None,
        want_correct: bool = False,
    ) -> torch.Tensor | LossOutput:
        """Logits (B, S, vocab), or with ``labels_BS`` the loss head's :class:`LossOutput`.

        Args:
            tokens_BS: token ids.
            position_ids_BS: RoPE positions; default restarts per document (or continues the cache).
            doc_ids_BS: document index per token for packed sequences (None = one document).
            cache: decoding state; the tokens continue the sequence held by the cache.
            labels_BS: target ids (``IGNORE_INDEX`` = no loss): return the summed cross entropy
                computed chunk by chunk (:func:`chunked_lm_loss`), never holding all logits.
            want_correct: with labels, also report where the argmax prediction equals the label.
        """
        B, S = tokens_BS.shape
        if cache is not None and doc_ids_BS is not None:
            raise ValueError("decoding with a cache handles one document per row; drop doc_ids_BS")
        if position_ids_BS is None:
            if doc_ids_BS is not None:
                position_ids_BS = positions_from_docs(doc_ids_BS)
            else:
                start = cache.seen if cache is not None else 0
                position_ids_BS = torch.arange(start, start + S, device=tokens_BS.device).expand(B, S)
        h = self.tok_embeddings(tokens_BS)
        cos, sin = self.rope(position_ids_BS, torch.float32)  # apply_rope casts back to q/k's dtype
        batch = AttentionBatch(doc_ids_BS=doc_ids_BS)
        if self.activation_offload is not None and torch.is_grad_enabled():
            self.activation_offload.reset()
        for layer in self.layers:
            training = torch.is_grad_enabled() and cache is None
            if self.activation_checkpointing == "full" and training:
                h = checkpoint(layer, h, cos, sin, batch, use_reentrant=False)
            elif self.activation_checkpointing == "attention_boundary" and training:
                h = layer(h, cos, sin, batch, attention_boundary=True)
            else:
                h = layer(h, cos, sin, batch, cache)
        if cache is not None:
            cache.seen += S
        if self.activation_offload is not None and torch.is_grad_enabled():
            self.activation_offload.check_moved()
        h = self.norm(h)
        if labels_BS is None:
            return self.output(h)
        chunk = self.loss_chunk_tokens
        if chunk == 0:
            chunk = max(1, LOSS_CHUNK_BYTES // (4 * self.cfg.vocab_size))
        return chunked_lm_loss(h, self.output.weight, labels_BS, chunk, want_correct)


class LossOutput(NamedTuple):
    """What the loss head returns.

    Args:
        loss_sum: summed next-token cross entropy over counted labels (fp32 scalar).
        n_tokens: number of counted labels (int64 scalar).
        correct_BS: (B, S) bool, argmax == label at counted positions (only with ``want_correct``).
    """

    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    correct_BS: torch.Tensor | None = None


def _chunk_loss(h_TE: torch.Tensor, weight_WE: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    logits_TW = F.linear(h_TE, weight_WE)
    return F.cross_entropy(logits_TW.float(), labels_T, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(
    h_BSE: torch.Tensor, weight_WE: torch.Tensor, labels_BS: torch.Tensor, chunk_tokens: int | None,
    want_correct: bool = False,
) -> LossOutput:
    """Output projection + cross entropy over chunks of tokens, recomputed in backward.

    Each chunk's logits (computed in the autocast dtype, the softmax in fp32) live only while that
    chunk is processed: under autograd every chunk is a non-reentrant checkpoint that saves its
    slice of ``h`` (already alive) and recomputes the logits in backward, so the head holds
    ``chunk_tokens x vocab`` fp32 logits at a time instead of ``B x S x vocab``.

    Args:
        h_BSE: final normed hidden states.
        weight_WE: output projection (the embedding matrix when tied).
        labels_BS: target ids, ``IGNORE_INDEX`` where no loss is taken.
        chunk_tokens: tokens per chunk; None = one pass over all tokens (the plain head).
        want_correct: also return where argmax == label (evaluation; forward only).
    """
    h_TE, labels_T = h_BSE.flatten(0, 1), labels_BS.flatten()
    N = h_TE.shape[0]
    step = N if chunk_tokens is None else max(1, chunk_tokens)
    grad = torch.is_grad_enabled() and (h_TE.requires_grad or weight_WE.requires_grad)
    total = torch.zeros((), dtype=torch.float32, device=h_TE.device)
    correct = [] if want_correct else None
    for a in range(0, N, step):
        h_c, lab_c = h_TE[a : a + step], labels_T[a : a + step]
        if want_correct:
            with torch.no_grad():
                logits = F.linear(h_c, weight_WE)
                correct.append((logits.argmax(-1) == lab_c) & (lab_c != IGNORE_INDEX))
                total = total + F.cross_entropy(logits.float(), lab_c, ignore_index=IGNORE_INDEX, reduction="sum")
            continue
        if grad and step < N:
            total = total + checkpoint(_chunk_loss, h_c, weight_WE, lab_c, use_reentrant=False)
        else:
            total = total + _chunk_loss(h_c, weight_WE, lab_c)
    n = (labels_T != IGNORE_INDEX).sum()
    return LossOutput(total, n, torch.cat(correct).view_as(labels_BS) if want_correct else None)


def loss_from_logits(logits_BSW: torch.Tensor, labels_BS: torch.Tensor, want_correct: bool = False) -> LossOutput:
    """:class:`LossOutput` of already computed logits (models or stand-ins that produce logits)."""
    loss, n = cross_entropy_sum(logits_BSW, labels_BS)
    correct = (logits_BSW.argmax(-1) == labels_BS) & (labels_BS != IGNORE_INDEX) if want_correct else None
    return LossOutput(loss, n, correct)


def cross_entropy_sum(logits_BSW: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy (fp32) and the number of counted labels.

    Args:
        logits_BSW: model output.
        labels_BS: target ids, ``IGNORE_INDEX`` where no loss is taken.
    """
    loss = F.cross_entropy(
        logits_BSW.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels_BS != IGNORE_INDEX).sum()
