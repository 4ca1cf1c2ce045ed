"""Data parallelism applied to a single-device model: DDP or FSDP2 (``fully_shard``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from longshard.models.model import Transformer
from longshard.parallel.deepspeed_engine import is_deepspeed_engine
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


def data_parallel(model: Transformer, mesh: DeviceMesh, dp_mode: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap ``model`` for data parallel training over ``mesh["dp"]``.

    Gradients are reduced over the whole (dp, sp) mesh: sequence-parallel ranks hold different
    tokens of the same samples, so their parameter gradients add up like those of data-parallel
    ranks (the trainer scales the loss by the world size over the global token count).

    Args:
        model: single-device model, already on its device, identical on every rank.
        mesh: device mesh with ``dp`` and ``sp`` dimensions.
        dp_mode: ``ddp`` (gradient all-reduce) or ``fsdp2`` (each block and the root sharded).
        dtype: compute dtype of a mixed-precision run (``torch.bfloat16``) or None (fp32). FSDP2 then
            gathers parameters in ``dtype`` for compute and reduce-scatters gradients in fp32 into fp32
            shards (the optimizer's master weights), as torchtitan does. DDP keeps fp32 parameters,
            an fp32 all-reduce and the trainer's autocast for bf16 compute.

    Returns:
        The wrapped module; use :func:`unwrap` to reach the :class:`Transformer`.
    """
    if dp_mode == "ddp":
        device_ids = [model.output.weight.device.index] if model.output.weight.is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids)  # default group = every rank
    if dp_mode == "fsdp2":
        # 2-D (HSDP): replicate over dp, shard over the sequence group (hybrid: its flattened ring x uly)
        shard_mesh = mesh["dp", "sp"] if mesh["sp"].size() > 1 else mesh["dp"]
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None else \
            MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mesh=shard_mesh, mp_policy=mp)
        fully_shard(model, mesh=shard_mesh, mp_policy=mp)
        return model
    raise ValueError(f"unknown dp_mode {dp_mode!r}: use ddp or fsdp2")


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back into its sharded state (a forward outside training leaves the root's
    parameters gathered; the optimizer and checkpoints must see the sharded ones)."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unwrap(model: nn.Module) -> Transformer:
    """The :class:`Transformer` inside a DDP wrapper or DeepSpeed engine (FSDP2 keeps the module itself)."""
    if isinstance(model, DistributedDataParallel) or is_deepspeed_engine(model):
        return model.module
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter for non-final micro-batches of an accumulation."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (DTensor-aware) and return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    meshes = {p.grad.device_mesh for p in params if isinstance(p.grad, DTensor)}
    if len(meshes) > 1:  # tensor parallel under FSDP2: parameters live on 1-D and 2-D meshes
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in params]
        norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
        total = torch.linalg.vector_norm(torch.stack(norms))
        if max_norm > 0:
            coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
            for p in params:
                p.grad.mul_(coef)
        return float(total)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)
