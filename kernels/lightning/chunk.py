"""Lightning attention, blocked form: exact intra-block attention + a running KV state between blocks.

Per block of C positions: O = ((Q K^T) * M) V + (Q * lambda^{j+1}) KV_prev with
M[j, l] = lambda^{j-l} (l <= j); state KV = lambda^C KV_prev + (K * lambda^{C-1-l})^T V.
Memory and time are linear in S. Documents reset the state; an initial state (from a previous
sequence shard or a decoding cache) continues the first document.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lightning_attention_chunk(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    log_decay_H: torch.Tensor,
    doc_ids_BS: torch.Tensor | None = None,
    chunk: int = 64,
    initial_state_BHDV: torch.Tensor | None = None,
    initial_doc_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked decayed linear attention.

    Args:
        q_BHSD, k_BHSD: (B, H, S, D) feature-mapped queries/keys.
        v_BHSD: (B, H, S, E) values.
        log_decay_H: (H,) a_h >= 0 (decay exp(-a_h) per position).
        doc_ids_BS: (B, S) non-decreasing document ids, or None.
        chunk: block size C.
        initial_state_BHDV: state sum_s lambda^{(-1) - s} k_s v_s^T of the tokens before position 0,
            or None.
        initial_doc_B: (B,) document id of the initial state (default: that of position 0, i.e.
            position 0 continues it); queries of other documents ignore it.

    Returns:
        ``(o_BHSV, final_state_BHDV)``; the final state is taken at the last position (fp32), for
        the document of the last token.
    """
    B, H, S, D = q_BHSD.shape
    E = v_BHSD.shape[-1]
    n = max(math.ceil(S / chunk), 1)
    pad = n * chunk - S  # left padding keeps the last position last: the final state needs no fix-up
    q = F.pad(q_BHSD.float(), (0, 0, pad, 0)).view(B, H, n, chunk, D)
    k = F.pad(k_BHSD.float(), (0, 0, pad, 0)).view(B, H, n, chunk, D)
    v = F.pad(v_BHSD.float(), (0, 0, pad, 0)).view(B, H, n, chunk, E)
    a = log_decay_H.float().to(q.device)[:, None]  # (H, 1)
    j = torch.arange(chunk, device=q.device, dtype=torch.float32)
    diff = j[:, None] - j[None, :]
    m_HCC = torch.exp(-a[:, :, None] * diff.clamp_min(0)) * (diff >= 0)  # intra-block decay mask
    q_decay_HC = torch.exp(-a * (j + 1))  # lambda^{j+1}
    k_decay_HC = torch.exp(-a * (chunk - 1 - j))  # lambda^{C-1-j}
    block_decay_H = torch.exp(-a[:, 0] * chunk)  # lambda^C

    if doc_ids_BS is not None:
        first = doc_ids_BS[:, :1]
        doc = F.pad(doc_ids_BS, (pad, 0), value=-1)
        doc = torch.where(torch.arange(n * chunk, device=doc.device) < pad, first - 1, doc).view(B, n, chunk)
    state = torch.zeros(B, H, D, E, device=q.device, dtype=torch.float32)
    state_doc = doc[:, 0, 0] if doc_ids_BS is not None else None  # the padding's own document
    outs = []
    for i in range(n):
        qi, ki, vi = q[:, :, i], k[:, :, i], v[:, :, i]
        w = m_HCC[None]
        if doc_ids_BS is not None:
            di = doc[:, i]  # (B, C)
            w = w * (di[:, None, :, None] == di[:, None, None, :])
        o = torch.einsum("bhcd,bhld->bhcl", qi, ki) * w
        o = torch.einsum("bhcl,bhle->bhce", o, vi)
        inter = torch.einsum("bhcd,bhde->bhce", qi * q_decay_HC[None, :, :, None], state)
        if doc_ids_BS is not None:
            inter = inter * (di == state_doc[:, None])[:, None, :, None]
        outs.append(o + inter)
        k_weight = k_decay_HC[None]  # (1 or B, H, C): only the last token's document enters the state
        if doc_ids_BS is not None:
            k_weight = k_weight * (di == di[:, -1:])[:, None]
        kv_new = torch.einsum("bhld,bhle->bhde", ki * k_weight[..., None], vi)
        carry = block_decay_H[None, :, None, None]
        if doc_ids_BS is not None:
            carry = carry * (di[:, -1] == state_doc)[:, None, None, None]
            state_doc = di[:, -1]
        state = carry * state + kv_new
    o = torch.stack(outs, dim=2).reshape(B, H, n * chunk, E)[:, :, pad:]
    if initial_state_BHDV is not None:  # tokens before position 0: exact decays lambda^{t+1}, no padding shift
        extra, carried = initial_state_contribution(q_BHSD, log_decay_H, initial_state_BHDV, doc_ids_BS, initial_doc_B)
        o = o + extra
        state = state + carried
    return o.to(q_BHSD.dtype), state


def initial_state_contribution(
    q_BHSD: torch.Tensor,
    log_decay_H: torch.Tensor,
    initial_state_BHDV: torch.Tensor,
    doc_ids_BS: torch.Tensor | None = None,
    initial_doc_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a state from before position 0 adds: to each output (lambda^{t+1} q_t S0) and to the final
    state (lambda^S S0), restricted to the document it belongs to (fp32).

    Returns:
        ``(extra_o_BHSV, extra_state_BHDV)``.
    """
    S = q_BHSD.shape[2]
    a = log_decay_H.float().to(q_BHSD.device)[:, None]
    s0 = initial_state_BHDV.float()
    t = torch.arange(S, device=q_BHSD.device, dtype=torch.float32)
    extra = torch.einsum("bhtd,bhde->bhte", q_BHSD.float() * torch.exp(-a * (t + 1))[None, :, :, None], s0)
    carry = torch.exp(-a[:, 0] * S)[None, :, None, None]
    if doc_ids_BS is not None:
        d0 = doc_ids_BS[:, 0] if initial_doc_B is None else initial_doc_B.to(doc_ids_BS.device)
        extra = extra * (doc_ids_BS == d0[:, None])[:, None, :, None]
        carry = carry * (doc_ids_BS[:, -1] == d0)[:, None, None, None]
    return extra, carry * s0


def lightning_attention_recurrent(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    log_decay_H: torch.Tensor,
    initial_state_BHDV: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrent form (decoding): S_t = lambda S_{t-1} + k_t v_t^T, o_t = q_t S_t."""
    B, H, S, D = q_BHSD.shape
    E = v_BHSD.shape[-1]
    lam = torch.exp(-log_decay_H.float().to(q_BHSD.device))[None, :, None, None]
    state = (
        initial_state_BHDV.float()
        if initial_state_BHDV is not None
        else torch.zeros(B, H, D, E, device=q_BHSD.device, dtype=torch.float32)
    )
    outs = []
    for t in range(S):
        state = lam * state + torch.einsum("bhd,bhe->bhde", k_BHSD[:, :, t].float(), v_BHSD[:, :, t].float())
        outs.append(torch.einsum("bhd,bhde->bhe", q_BHSD[:, :, t].float(), state))
    return torch.stack(outs, dim=2).to(q_BHSD.dtype), state
