"""MoH's per-token head weights.

Heads [0, Hs) are shared (always on), heads [Hs, H) routed. For a token x (fp32):

* ``alpha = 2 softmax(W0 x)`` weighs the shared group (alpha_1) against the routed group (alpha_2); a
  layer with one group only (no shared or no routed heads) has no W0 and that group's alpha is 1, as in
  the reference code (SkyworkAI/MoH);
* shared head i: ``g_i = alpha_1 * Hs * softmax(Ws x)_i``;
* routed: the top-k of the router logits ``Wr x`` (detached: the choice passes no gradient; ties go to
  the lower head), renormalised over the chosen heads: ``g_i = alpha_2 * k * softmax_{chosen}(Wr x)_i``,
  0 for the others.

The group-size factors (Hs, k) make every active head's weight exactly 1 when the router weights are 0,
so a dense checkpoint converted with zero routers computes its own heads unchanged (only the routed
heads not chosen are dropped). The load-balance loss is the reference's ``Hr * sum_i f_i P_i`` over
routed heads (f_i: share of the tokens that chose head i, P_i: mean router probability): ``top_k`` when
the routing is balanced. The three routers run as one matmul (their weights concatenated).
Shapes: B batch, S positions, E model width, H heads (Hs shared, Hr routed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoHGates:
    """What :func:`moh_gates` returns.

    Args:
        g_BSH: weight of every head for every token (0 for routed heads not chosen).
        chosen_BSR: (B, S, Hr) bool: the routed heads each token runs.
        balance: the load-balance loss (a scalar; 0 when there are no routed heads).
        probs_BSR: (B, S, Hr) router probabilities (softmax over every routed head), what ``balance``
            averages; None when there are no routed heads.
    """

    g_BSH: torch.Tensor
    chosen_BSR: torch.Tensor
    balance: torch.Tensor
    probs_BSR: torch.Tensor | None = None


def balance_loss(chosen_BSR: torch.Tensor, probs_BSR: torch.Tensor, top_k: int, n_routed: int) -> torch.Tensor:
    """``n_routed * sum_i f_i P_i`` over the routed heads given (all of them, or a slice: the slices' sums
    add up to the whole): f_i the share of the tokens that chose head i, P_i its mean router probability,
    both over every token of the batch (the MoH reference's ``mean(me * ce) * E * E``; ``top_k`` when
    balanced; longshard before 2026-12 divided it by ``top_k``).

    Args:
        chosen_BSR, probs_BSR: (B, S, R) choices and probabilities of R routed heads.
        top_k: routed heads each token runs.
        n_routed: routed heads of the layer (Hr), the loss's scale.
    """
    f_R = chosen_BSR.float().flatten(0, -2).mean(0)
    p_R = probs_BSR.float().flatten(0, -2).mean(0)
    return n_routed * (f_R * p_R).sum()


def moh_gates(x_BSE: torch.Tensor, w_shared_HE: torch.Tensor, w_routed_HE: torch.Tensor,
              w_mix_2E: torch.Tensor | None, top_k: int) -> MoHGates:
    """Head weights of every token (see the module doc).

    Args:
        x_BSE: the layer's (normed) input.
        w_shared_HE: (Hs, E) shared-head router.
        w_routed_HE: (Hr, E) routed-head router.
        w_mix_2E: (2, E) weights of the shared vs the routed group; None when the layer has one group.
        top_k: routed heads each token runs.
    """
    with torch.autocast(x_BSE.device.type, enabled=False):  # fp32 under bf16/fp16 autocast too
        return _gates_fp32(x_BSE.float(), w_shared_HE, w_routed_HE, w_mix_2E, top_k)


def _gates_fp32(x: torch.Tensor, w_shared_HE: torch.Tensor, w_routed_HE: torch.Tensor,
                w_mix_2E: torch.Tensor | None, top_k: int) -> MoHGates:
    Hs, Hr = w_shared_HE.shape[0], w_routed_HE.shape[0]
    both = Hs > 0 and Hr > 0
    if both and w_mix_2E is None:
        raise ValueError("moh with shared and routed heads needs the group weights w_mix_2E")
    weights = [w_mix_2E] if both else []
    logits = x @ torch.cat([*weights, w_shared_HE, w_routed_HE]).float().t()  # one matmul for every router
    mix_BS2, shared_BSH, logits_BSR = logits.split([2 if both else 0, Hs, Hr], dim=-1)
    alpha_BS2 = 2.0 * torch.softmax(mix_BS2, dim=-1) if both else None
    parts = []
    if Hs:
        g_shared = Hs * torch.softmax(shared_BSH, dim=-1)
        parts.append(alpha_BS2[..., :1] * g_shared if both else g_shared)
    chosen = torch.zeros(*x.shape[:-1], Hr, dtype=torch.bool, device=x.device)
    balance = x.new_zeros(())
    probs = None
    if Hr:
        order = torch.sort(logits_BSR.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
        chosen = chosen.scatter(-1, order, True)
        routed = top_k * torch.softmax(logits_BSR.masked_fill(~chosen, float("-inf")), dim=-1)
        parts.append(alpha_BS2[..., 1:] * routed if both else routed)
        probs = torch.softmax(logits_BSR, dim=-1)
        balance = balance_loss(chosen, probs, top_k, Hr)
    return MoHGates(torch.cat(parts, dim=-1), chosen, balance, probs)
