"""Training: the activations core attentions save for backward, kept in host memory.

``train.activation_offload: kv`` moves the keys/values each core attention saves for backward to host
memory (pinned, copied on a side stream on CUDA; accounted on CPU) and prefetches them in backward;
``attention`` moves everything the core saves. :class:`SavedTensorMeter` measures what a region
saves (the memory-scaling tests and the planner use it). Decoding with the KV cache in host memory
is :mod:`longshard.models.offload`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from longshard.errors import ConfigError

log = logging.getLogger(__name__)

ACTIVATION_OFFLOAD_MODES = ("none", "kv", "attention")


@dataclass
class _Saved:
    """One saved tensor handed to host memory (or, on CPU, accounted as such)."""

    host: torch.Tensor
    device: torch.device
    region: int
    ready: torch.cuda.Event | None = None  # device->host copy done
    fetched: torch.Tensor | None = None  # prefetched device copy
    fetched_ready: torch.cuda.Event | None = None


class ActivationOffload:
    """Keeps what core attentions save for backward in host memory, prefetched during backward.

    Used as ``with offload.region(k, v): o = core(q, k, v, batch)`` inside each attention layer
    (autograd saved-tensor hooks). ``kv`` moves the saved tensors that are the layer's keys/values
    (tensors sharing their storage, as SDPA/flash paths save them); ``attention`` moves everything
    the core attention saves (K/V, queries, outputs, log-sum-exps, masks). On CUDA the copies go to
    pinned memory on a side stream; when backward first reads a layer's tensors, the previous
    layer's (the next one backward needs) are copied back ahead of time. On CPU the tensors already
    live in host memory: they are only accounted (``offloaded_bytes``).

    ``kv`` finds keys/values by storage, so it moves them for paths that save their inputs as they
    are (dense SDPA/naive, gather, NSA/NOSA, Triton); paths that save transformed copies (the banded
    CPU path saves padded K/V) move nothing in ``kv`` mode (logged once): use ``attention``.

    Args:
        mode: ``kv`` or ``attention`` (``none`` is :data:`None` at the call site).
        meter: optional :class:`SavedTensorMeter` told about the tensors left on the device.
    """

    def __init__(self, mode: str, meter: SavedTensorMeter | None = None) -> None:
        if mode not in ACTIVATION_OFFLOAD_MODES[1:]:
            raise ConfigError("train.activation_offload", f"unknown mode {mode!r}.",
                              f"use one of: {', '.join(ACTIVATION_OFFLOAD_MODES)}.")
        self.mode = mode
        self.meter = meter
        self.offloaded_bytes = 0
        self._moved: set[int] = set()
        self._warned = False
        self._regions: list[list[_Saved]] = []
        self._stream: torch.cuda.Stream | None = None

    def reset(self) -> None:
        """Forget the previous step's records (called at each training forward)."""
        self.offloaded_bytes = 0
        self._regions = []
        self._moved = set()

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def region(self, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor):
        """Context manager for one core-attention call (a 'region' = one layer)."""
        kv_storage = {k_BHSD.untyped_storage().data_ptr(), v_BHSD.untyped_storage().data_ptr()}
        region = len(self._regions)
        self._regions.append([])

        def pack(t: torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if self.mode == "kv" and ptr not in kv_storage:
                if self.meter is not None:
                    self.meter.track(t)
                return t
            if ptr not in self._moved:
                self._moved.add(ptr)
                self.offloaded_bytes += t.untyped_storage().nbytes()
            if t.device.type != "cuda":
                rec = _Saved(t, t.device, region)
            else:
                stream = self._side_stream(t.device)
                stream.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(stream):
                    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                    host.copy_(t, non_blocking=True)
                    t.record_stream(stream)  # keep t's memory until the copy is done
                    ready = torch.cuda.Event()
                    ready.record(stream)
                rec = _Saved(host, t.device, region, ready)
            self._regions[region].append(rec)
            return rec

        def unpack(rec):
            if not isinstance(rec, _Saved):
                return rec
            if rec.device.type != "cuda":
                return rec.host
            if rec.region > 0:  # backward walks layers in reverse: bring the previous layer back now
                self._prefetch(rec.region - 1)
            if rec.fetched is not None:
                compute = torch.cuda.current_stream(rec.device)
                compute.wait_event(rec.fetched_ready)
                out, rec.fetched = rec.fetched, None
                # allocated on the side stream, used on the compute stream: without this the caching
                # allocator could hand its memory to the next prefetch while backward still reads it
                out.record_stream(compute)
                return out
            rec.ready.synchronize()
            return rec.host.to(rec.device, non_blocking=True)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def check_moved(self) -> None:
        """Log once when ``kv`` mode found no keys/values to move in a forward."""
        if self.mode == "kv" and self.offloaded_bytes == 0 and self._regions and not self._warned:
            self._warned = True
            log.warning("activation_offload=kv moved nothing: these attention paths save transformed K/V "
                        "copies, not the K/V tensors; use activation_offload=attention")

    def _prefetch(self, region: int) -> None:
        for rec in self._regions[region]:
            if rec.fetched is not None or rec.device.type != "cuda":
                continue
            stream = self._side_stream(rec.device)
            with torch.cuda.stream(stream):
                stream.wait_event(rec.ready)
                rec.fetched = rec.host.to(rec.device, non_blocking=True)
                rec.fetched_ready = torch.cuda.Event()
                rec.fetched_ready.record(stream)


class SavedTensorMeter:
    """Counts the bytes autograd keeps on the compute device for backward (distinct storages).

    ``with meter: loss = model(x)...`` -> ``meter.bytes``. Saved-tensor hooks nest: inside an
    :class:`ActivationOffload` region that one decides, and reports what it leaves on the device
    when given this meter (``offload.meter = meter``). Allocation counting for CPU tests, where host
    and compute memory are the same.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage once."""
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.track(t)
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
