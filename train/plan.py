"""Layout planner: per-GPU memory and communication of each way to run a recipe on N GPUs.

``longshard plan RECIPE --gpus N --gpu-mem 80GB`` enumerates data parallel (``ddp``/``fsdp2``) x
sequence parallel (degree, ``ulysses``/``ring``/``hybrid``) x tensor parallel (degree; FSDP2) x
activation checkpointing x activation offload, keeps the layouts the config validation accepts,
and estimates for each:

* model states: fp32 parameters, gradients and AdamW moments (16 bytes per parameter); tensor
  parallel splits the attention and FFN projections over tp (embeddings, norms and the output
  layer stay whole), FSDP2 shards the rest over its shard group (dp, or sp for the 2-D layout),
  plus two unsharded blocks in flight;
  gradients appear as activations are freed, so the peak is the largest of: start of backward
  (parameters, moments, activations, loss head), a checkpointed block's recomputation, and the
  optimizer step (16 bytes plus one parameter-sized temporary);
* activations: what our blocks save for backward per token (two RMSNorms in fp32, the
  projections' inputs, the core attention's saved tensors, the SwiGLU intermediates), for the
  micro-batch's local tokens (seq_len / sp), under each checkpointing mode; under tensor
  parallel the per-head and FFN-width tensors are split over tp, the model-width ones are not.
  The core attention's bytes per token are measured, not assumed: each distinct layer's core is
  run alone with the real head layout at two probe lengths on CPU
  (:func:`longshard.train.memory.core_saved_bytes_per_token`), which every path and
  sequence-parallel form keeps flat per local token (``tests/models/test_memory_scale.py``);
* the loss head: one chunk's logits, their fp32 log-softmax and its gradient
  (``train.loss_chunk_tokens``; all of them with ``-1``);
* communication per optimizer step and GPU: gradient all-reduce (DDP) or all-gather x 2 +
  reduce-scatter per micro-batch (FSDP2), plus the sequence-parallel volume per layer (the same
  analytic formulas the communication counter is tested against), plus tensor parallel's four
  all-reduces of the block activations per layer (two forward, two backward).

The estimate models this codebase's fp32-parameter training; tests compare it with the measured
peak of live tensors on CPU (:class:`longshard.train.memory.TensorMemoryTracker`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from dataclasses import dataclass

import torch
from longshard.errors import ConfigError
from longshard.models.config import ModelConfig
from longshard.models.model import Transformer
from longshard.train.precision import activation_bytes

GIB = 1024**3
log = logging.getLogger(__name__)


def parse_bytes(text: str) -> int:
    """``80GB``, ``80GiB``, ``40G``, ``512MB`` -> bytes (GB and GiB both mean 2**30, as GPU specs do)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError("--gpu-mem", f"cannot read {text!r}.", "write it like 80GB or 40GiB.")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class Layout:
    """One way to run: degrees, modes, checkpointing, offload."""

    dp: int
    sp: int
    sp_mode: str
    dp_mode: str
    activation_checkpointing: str
    activation_offload: str
    tp: int = 1

    def overrides(self) -> list[str]:
        return [f"parallel.sp_degree={self.sp}", f"parallel.sp_mode={self.sp_mode}", f"parallel.dp_mode={self.dp_mode}",
                f"train.activation_checkpointing={self.activation_checkpointing}",
                f"train.activation_offload={self.activation_offload}",
                *([f"parallel.tp_degree={self.tp}"] if self.tp > 1 else [])]


@dataclass
class Estimate:
    """Per-GPU bytes by component and communication bytes per optimizer step."""

    states: int
    activations: int
    loss_head: int
    total: int
    comm_bytes: int


TP_SPLIT = ("attention.wq.", "attention.wk.", "attention.wv.", "attention.wo.", "attention.wg.",
            "feed_forward.w1.", "feed_forward.w2.", "feed_forward.w3.")  # what tensor parallel splits


_PARAMS: dict[tuple[str, int], tuple[float, float]] = {}  # (model config, tp) -> counts: one build per model


def param_count(mcfg: ModelConfig, tp: int = 1) -> tuple[float, float]:
    """(parameters per tensor-parallel rank, those of the largest block), counted on the meta device."""
    key = (repr(mcfg), tp)
    if key not in _PARAMS:
        _PARAMS[key] = _param_count(mcfg, tp)
    return _PARAMS[key]


def _param_count(mcfg: ModelConfig, tp: int) -> tuple[float, float]:
    """From shapes, one meta-device layer per kind: layers built with the same attention spec
    (:meth:`~longshard.models.config.ModelConfig.layer_attention`, per-layer schedules resolved) have the
    same parameters, so a 200,000-layer config plans as fast as a 2-layer one."""
    from dataclasses import replace

    from longshard.models.model import TransformerBlock

    def local(named) -> float:  # the row-parallel output bias stays whole on every rank
        return sum(p.numel() / (tp if any(k in n for k in TP_SPLIT) and n.split(".")[-2:] != ["wo", "bias"]
                                else 1) for n, p in named)

    kinds: dict[str, list[int]] = {}  # kind (the layer's resolved attention spec) -> layer indices
    for i in range(mcfg.n_layers):
        kinds.setdefault(repr(mcfg.layer_attention(i)), []).append(i)
    with torch.device("meta"):
        blocks = {kind: local(TransformerBlock(mcfg, idx[0]).named_parameters()) for kind, idx in kinds.items()}
        shell = Transformer(replace(mcfg, n_layers=1, attention=[mcfg.layer_attention(0)]))
    outside = local(shell.named_parameters()) - local(shell.layers[0].named_parameters())
    total = outside + sum(blocks[kind] * len(idx) for kind, idx in kinds.items())
    return total, max(blocks.values())


_CORE_BYTES: dict = {}


def core_bytes_per_token(mcfg: ModelConfig, act_bytes: int) -> list[float]:
    """Measured saved bytes per token of each layer's core attention (cached per config and dtype).

    Layers whose cores are alike (same spec, class and declared FLOPs) are measured once. A core
    that cannot run on this machine (e.g. a CUDA-only backend) falls back to q, k, v, output and
    log-sum-exp, with a warning.
    """
    from longshard.models.attention import AttentionContext, build_attention
    from longshard.train.memory import core_saved_bytes_per_token

    key = (repr(mcfg), act_bytes)
    if key in _CORE_BYTES:
        return _CORE_BYTES[key]
    H, kv, hd = mcfg.n_query_heads, mcfg.n_kv_heads, mcfg.head_dim
    formula = (2 * H * hd + 2 * kv * hd) * act_bytes + H * 4  # q, o, k, v, lse
    dtype = torch.bfloat16 if act_bytes == 2 else None
    alike: dict = {}
    out = []
    for i in range(mcfg.n_layers):
        spec = mcfg.layer_attention(i)
        core = build_attention(spec.name, spec.options, AttentionContext(
            layer_idx=i, n_layers=mcfg.n_layers, n_heads=H, n_kv_heads=kv, head_dim=hd, model_dim=mcfg.dim))
        kind = (repr(spec), type(core).__name__, core.attention_flops_per_token(4096))
        if kind not in alike:
            try:
                alike[kind] = core_saved_bytes_per_token(mcfg, i, dtype)
            except Exception as e:  # noqa: BLE001 - any failure to run the probe: fall back, say so
                log.warning("layer %d (%s): cannot measure its saved bytes here (%s); counting q, k, v, "
                            "output and log-sum-exp", i, spec.name, e)
                alike[kind] = float(formula)
        out.append(alike[kind])
    _CORE_BYTES[key] = out
    return out


def loss_chunk(cfg, vocab: int, tokens: int) -> int:
    """Tokens whose logits the loss head holds at once (``train.loss_chunk_tokens``)."""
    from longshard.models.model import LOSS_CHUNK_BYTES

    n = cfg.train.loss_chunk_tokens
    if n < 0:
        return tokens
    return min(tokens, n if n > 0 else max(1, LOSS_CHUNK_BYTES // (4 * vocab)))


def saved_per_token_layer(mcfg: ModelConfig, act_bytes: int, mode: str, offload: str,
                          tp: int = 1, core_bytes: float | None = None) -> tuple[float, float]:
    """Bytes per token one block keeps for backward on the device, and what offload moves off it.

    What this codebase's block saves (checked against autograd's saved tensors in the tests):
    ``none``: the attention RMSNorm's fp32 input and normalised output, the FFN RMSNorm's
    normalised output (plus one fp32 scale per token each), the two normed projection inputs, the
    core attention's q, k, v, output and fp32 log-sum-exp, the output projection's input and the
    SwiGLU's w1/w3 outputs, silu and product; ``attention_boundary``: the block input and the core
    attention's saved tensors; ``full``: the block input. Tensor parallel splits the per-head and
    FFN-width tensors over ``tp``. ``core_bytes``: the core attention's measured bytes per token
    (all heads; see :func:`core_bytes_per_token`), else q, k, v, output and log-sum-exp.
    """
    E, F, hd = mcfg.dim, mcfg.ffn_hidden_dim / tp, mcfg.head_dim
    H, kv = mcfg.n_query_heads / tp, mcfg.n_kv_heads / tp
    core = (2 * H * hd + 2 * kv * hd) * act_bytes + H * 4 if core_bytes is None else core_bytes / tp
    if mode == "full":
        return E * act_bytes, 0.0
    if mode == "attention_boundary":
        kept = E * act_bytes + core
    else:
        norms = 3 * E * 4 + 2 * 4
        kept = norms + 2 * E * act_bytes + core + H * hd * act_bytes + 4 * F * act_bytes
    moved = core if offload == "attention" else ((2 * kv * hd) * act_bytes if offload == "kv" else 0.0)
    return kept - moved, moved


def base_per_token(mcfg: ModelConfig, act_bytes: int) -> float:
    """Saved bytes per token outside the blocks: RoPE cos/sin, final RMSNorm, output projection input."""
    return 2 * mcfg.head_dim * 4 + 2 * mcfg.dim * 4 + 4 + mcfg.dim * act_bytes + 8


def sp_bytes_per_layer(mode: str, sp: int, uly: int, local_tokens: int, mcfg: ModelConfig, elem: int) -> float:
    """Sequence-parallel bytes one rank sends per layer per micro-batch (forward + backward)."""
    if sp == 1:
        return 0.0
    H, kv, hd = mcfg.n_query_heads, mcfg.n_kv_heads, mcfg.head_dim
    if mode == "ulysses":  # q, k, v, o all-to-alls forward and their transposes backward
        return 2 * (sp - 1) / sp * local_tokens * hd * (2 * H + 2 * max(kv, sp)) * elem
    if mode == "ring":  # K/V hop sp-1 times forward and backward, dK/dV sp times
        return (4 * (sp - 1) + 2 * sp) * local_tokens * kv * hd * elem
    ring = sp // uly  # hybrid: Ulysses inside groups of uly ranks, ring across the groups
    u = 2 * (uly - 1) / uly * local_tokens * hd * (2 * H + 2 * max(kv, uly)) * elem
    r = (4 * (ring - 1) + 2 * ring) * local_tokens * uly * max(kv // uly, 1) * hd * elem
    return u + r


def estimate(cfg, mcfg: ModelConfig, layout: Layout, gpus: int) -> Estimate:
    """Per-GPU memory and per-step communication of ``layout`` for config ``cfg`` (a train Config)."""
    P, block_P = param_count(mcfg, layout.tp)
    act_bytes = activation_bytes(cfg.train.dtype)
    shard = (layout.sp if layout.sp > 1 else layout.dp) if layout.dp_mode == "fsdp2" else 1
    states = 16 * P / shard
    if layout.dp_mode == "fsdp2" and shard > 1:
        states += 2 * 4 * block_P  # the gathered block and the prefetched next one
    mb = cfg.train.micro_batch_size
    T = mb * cfg.train.seq_len // layout.sp
    cores = core_bytes_per_token(mcfg, act_bytes)
    kept_l = [saved_per_token_layer(mcfg, act_bytes, layout.activation_checkpointing, layout.activation_offload,
                                    layout.tp, c)[0] for c in cores]
    kept = max(kept_l)
    acts = T * (sum(kept_l) + base_per_token(mcfg, act_bytes))
    V = mcfg.vocab_size
    # one chunk's logits, their fp32 log-softmax kept for backward and its gradient
    loss_head = loss_chunk(cfg, V, T) * V * (act_bytes + 4 + 4)
    states_fwd = 12 * P / shard  # parameters + AdamW moments while activations live (gradients come later)
    peaks = [states_fwd + acts + loss_head, 20 * P / shard]  # start of backward; optimizer step (+ temporaries)
    if layout.activation_checkpointing != "none":  # a block recomputed in its backward: the last layer's
        full_block = max(saved_per_token_layer(mcfg, act_bytes, "none", layout.activation_offload, layout.tp, c)[0]
                         for c in cores)
        peaks.append(states_fwd + acts + T * full_block)
        # ... and the first layer's, when every other layer's gradients exist
        peaks.append(16 * P / shard + T * (base_per_token(mcfg, act_bytes) + kept + full_block))
    extra = states - 16 * P / shard  # FSDP2 blocks in flight
    total = max(peaks) + extra
    grad_accum = cfg.train.global_batch_size // (mb * layout.dp)
    tp_comm = grad_accum * mcfg.n_layers * 4 * 2 * (layout.tp - 1) / layout.tp * T * mcfg.dim * act_bytes
    if layout.dp_mode == "ddp":
        grad_comm = 2 * (layout.dp * layout.sp - 1) / (layout.dp * layout.sp) * 4 * P
    else:
        grad_comm = grad_accum * 3 * (shard - 1) / shard * 4 * P
        if layout.sp > 1 and layout.dp > 1:  # the replicate dimension all-reduces the sharded gradients
            grad_comm += 2 * (layout.dp - 1) / layout.dp * 4 * P / shard
    uly = cfg.parallel.sp_ulysses_degree if layout.sp_mode == "hybrid" else 1
    sp_comm = grad_accum * mcfg.n_layers * sp_bytes_per_layer(layout.sp_mode, layout.sp, uly, T, mcfg, act_bytes)
    return Estimate(int(states), int(acts), int(loss_head), int(total), int(grad_comm + sp_comm + tp_comm))


def candidate_layouts(gpus: int) -> list[Layout]:
    """Every combination worth checking on ``gpus`` GPUs (validity is decided by the config)."""
    out = []
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    for tp, sp in itertools.product(divisors, divisors):
        if gpus % (tp * sp):
            continue
        modes = ["none"] if sp == 1 else ["ulysses", "ring", "hybrid"]
        dp_modes = ("ddp", "fsdp2") if tp == 1 else ("fsdp2",)  # tensor parallel composes with FSDP2
        for mode, dp_mode, ac, off in itertools.product(modes, dp_modes, ("none", "attention_boundary", "full"),
                                                        ("none", "attention")):
            if ac == "full" and off != "none":
                continue
            out.append(Layout(gpus // (sp * tp), sp, "ulysses" if mode == "none" else mode, dp_mode, ac, off, tp))
    return out


@dataclass
class PlanRow:
    layout: Layout
    estimate: Estimate | None
    fits: bool
    reason: str = ""


def plan(
    recipe: str, overrides: list[str], gpus: int, gpu_mem: int, headroom: float = 0.9
) -> tuple[list[PlanRow], PlanRow | None]:
    """Rows for every candidate layout and the recommended one (None when nothing fits).

    Recommendation: among layouts whose estimate is within ``headroom`` x ``gpu_mem``, the least
    recomputation (none < attention_boundary < full), then no offload, then the least
    communication, then DDP over FSDP2.

    Tensor-parallel rows split what the trainer splits (:mod:`longshard.parallel.tensor_parallel`);
    their activation and state formulas follow the same accounting as tp = 1, which the tests
    compare with measured peaks, and the per-rank parameter count is checked against the real
    split.
    """
    from longshard.train.config import load_config
    from longshard.train.resolve import check_layout, resolve_model_config

    if gpus < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {gpus}.")
    load_config(recipe, overrides, check_files=False)  # a bad recipe or override fails here, naming the field
    rows = []
    for lay in candidate_layouts(gpus):
        try:
            cfg = load_config(recipe, [*overrides, *lay.overrides()], check_files=False)
            if cfg.parallel.sp_mode == "hybrid" and lay.sp % cfg.parallel.sp_ulysses_degree:
                raise ConfigError("parallel.sp_ulysses_degree", "does not divide the sp degree.")
            mcfg = resolve_model_config(cfg)
            check_layout(cfg, mcfg, gpus)  # the trainer's own checks: batch split, heads over tp and Ulysses
        except ConfigError as e:
            rows.append(PlanRow(lay, None, False, f"{e.field}: {e.problem}"))
            continue
        est = estimate(cfg, mcfg, lay, gpus)
        rows.append(PlanRow(lay, est, est.total <= headroom * gpu_mem))
    ac_rank = {"none": 0, "attention_boundary": 1, "full": 2}
    fitting = [r for r in rows if r.fits]
    best = min(fitting, key=lambda r: (ac_rank[r.layout.activation_checkpointing],
                                       r.layout.activation_offload != "none", r.estimate.comm_bytes,
                                       r.layout.dp_mode != "ddp"), default=None)
    return rows, best


def format_plan(rows: list[PlanRow], best: PlanRow | None, gpu_mem: int, show_invalid: bool = False) -> str:
    """A text table (GiB, comm GiB per step) with the recommendation last."""
    lines = [f"{'dp':>3} {'sp':>3} {'tp':>3} {'sp_mode':<8} {'dp_mode':<6} {'checkpointing':<18} {'offload':<9} "
             f"{'states':>7} {'acts':>7} {'logits':>7} {'total':>7} {'comm/step':>10}  fits"]
    for r in rows:
        lay = r.layout
        head = (f"{lay.dp:>3} {lay.sp:>3} {lay.tp:>3} {lay.sp_mode if lay.sp > 1 else '-':<8} {lay.dp_mode:<6} "
                f"{lay.activation_checkpointing:<18} {lay.activation_offload:<9} ")
        if r.estimate is None:
            if show_invalid:
                lines.append(head + f"invalid: {r.reason}")
            continue
        e = r.estimate
        lines.append(head + f"{e.states / GIB:7.2f} {e.activations / GIB:7.2f} {e.loss_head / GIB:7.2f} "
                     f"{e.total / GIB:7.2f} {e.comm_bytes / GIB:10.2f}  {'yes' if r.fits else 'no'}")
    lines.append("")
    if best is None:
        lines.append(f"nothing fits in {gpu_mem / GIB:.0f} GiB per GPU: lower train.micro_batch_size or seq_len, "
                     "use more GPUs, or a sparser attention variant")
    else:
        lines.append("recommended: " + " ".join(best.layout.overrides())
                     + f"  (~{best.estimate.total / GIB:.1f} GiB per GPU)")
    return "\n".join(lines)


def as_records(rows: list[PlanRow]) -> list[dict]:
    """JSON-friendly rows."""
    out = []
    for r in rows:
        rec = {**dataclasses.asdict(r.layout), "fits": r.fits, "reason": r.reason}
        if r.estimate is not None:
            rec.update({f"{k}_bytes" if k != "comm_bytes" else "comm_bytes_per_step": v
                        for k, v in dataclasses.asdict(r.estimate).items()})
        out.append(rec)
    return out


__all__ = ["Estimate", "Layout", "PlanRow", "as_records", "estimate", "format_plan", "parse_bytes", "plan"]
