"""Live tensor memory accounting that works on any device, CPU included.

``torch.cuda.max_memory_allocated`` has no CPU counterpart; :class:`TensorMemoryTracker` counts
the bytes of every tensor storage alive (created under it, or registered with :meth:`track`) and
keeps the peak. It sees what PyTorch allocates for tensors, not allocator caching or Python
objects, which is what a per-device memory budget is about.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """``with TensorMemoryTracker() as mem: ...`` -> ``mem.peak`` bytes of live tensor storages.

    Tensors that exist before (parameters, optimizer states) are added with :meth:`track`.
    Autograd's backward runs its ops on the calling thread on CPU, so they are seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int, n: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= n

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage while it lives (once, however many tensors view it)."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self.live:
            return
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key, n)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self.track(t)
        return out


class _SavedBytes:
    """A ``saved_tensors_hooks`` pack hook counting each distinct saved tensor once while ``active``."""

    def __init__(self) -> None:
        self.seen: dict = {}
        self.active = False

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            self.seen[key] = t.numel() * t.element_size()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def saved_attention_bytes(model, tokens_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None,
                          dtype: torch.dtype | None = None, position_ids_BS: torch.Tensor | None = None) -> int:
    """Bytes autograd saves for backward inside the model's core attentions during one forward.

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` between each core attention's forward
    pre-hook and forward hook, each distinct (storage, offset, shape) once (a tensor saved by several
    ops is held once). The forward runs the loss head (``labels_BS = tokens``) under ``dtype`` autocast.

    Args:
        model: a :class:`~longshard.models.model.Transformer` (unwrapped, or with SP wrappers as cores).
        tokens_BS: input ids.
        doc_ids_BS: packed-document ids or None.
        dtype: autocast dtype (e.g. ``torch.bfloat16``) or None for fp32.
        position_ids_BS: positions of a sequence shard (sequence-parallel models), or None.
    """
    count = _SavedBytes()
    handles = []
    for layer in model.layers:
        core = layer.attention.core_attention
        handles.append(core.register_forward_pre_hook(lambda m, a: setattr(count, "active", True)))
        handles.append(core.register_forward_hook(lambda m, a, o: setattr(count, "active", False)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t), \
                torch.autocast(tokens_BS.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(tokens_BS, doc_ids_BS=doc_ids_BS, labels_BS=tokens_BS, position_ids_BS=position_ids_BS)
    finally:
        for h in handles:
            h.remove()
    return count.total


PROBE_LENGTHS = (256, 512)


def core_saved_bytes_per_token(mcfg, layer_idx: int, dtype: torch.dtype | None = None,
                               lengths: tuple[int, int] = PROBE_LENGTHS) -> float:
    """Bytes per token layer ``layer_idx``'s core attention saves for backward, measured.

    The core is built alone with the model's real head layout and run forward on CPU at two
    lengths; the result is the growth per token between them (constant terms such as variant
    parameters drop out). This is what the planner counts instead of a formula, so a variant's
    own saved tensors (linear states, NSA branches, gathered blocks) are included as they are.

    Args:
        mcfg: the :class:`~longshard.models.config.ModelConfig`.
        layer_idx: which layer's attention spec to measure.
        dtype: the compute dtype q, k, v arrive in (None = fp32).
        lengths: the two probe lengths.
    """
    from longshard.models.attention import AttentionBatch, AttentionContext, build_attention

    spec = mcfg.layer_attention(layer_idx)
    H, K, D = mcfg.n_query_heads, mcfg.n_kv_heads, mcfg.head_dim
    core = build_attention(spec.name, spec.options, AttentionContext(
        layer_idx=layer_idx, n_layers=mcfg.n_layers, n_heads=H, n_kv_heads=K, head_dim=D, model_dim=mcfg.dim))
    act = dtype or torch.float32
    totals = []
    for S in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, S, D, generator=g).to(act).requires_grad_() for h in (H, K, K))
        x = torch.randn(1, S, mcfg.dim, generator=g).to(act)
        count = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(count.pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            count.active = True
            core(q, k, v, AttentionBatch(x_BSE=x))
        totals.append(count.total)
    return (totals[1] - totals[0]) / (lengths[1] - lengths[0])
