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


def saved_attention_bytes(model, tokens_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None,
                          dtype: torch.dtype | None = None) -> int:
    """Bytes autograd saves for backward inside the model's core attentions during one forward.

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` between each core attention's forward
    pre-hook and forward hook, each distinct (storage, offset, shape) once (a tensor saved by several
    ops is held once). The forward runs the loss head (``labels_BS = tokens``) under ``dtype`` autocast.

    Args:
        model: a :class:`~longshard.models.model.Transformer` (unwrapped, or with SP wrappers as cores).
        tokens_BS: input ids.
        doc_ids_BS: packed-document ids or None.
        dtype: autocast dtype (e.g. ``torch.bfloat16``) or None for fp32.
    """
    seen: dict = {}
    active: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if active:
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    handles = []
    for layer in model.layers:
        core = layer.attention.core_attention
        handles.append(core.register_forward_pre_hook(lambda m, a: active.append(1)))
        handles.append(core.register_forward_hook(lambda m, a, o: active.clear()))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(tokens_BS.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(tokens_BS, doc_ids_BS=doc_ids_BS, labels_BS=tokens_BS)
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())
