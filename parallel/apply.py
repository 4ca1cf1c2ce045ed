"""Parallelism applied to a single-device model in one fixed order (as torchtitan's ``parallelize_llama``).

:func:`parallelize` takes the model as the model code builds it (on its device, identical on every
rank) and applies, in this order:

1. **tensor parallel** over ``mesh["tp"]``: projections split by heads / FFN width, each layer given
   its head range (:meth:`~longshard.models.model.Attention.set_head_range`);
2. **sequence parallel** over ``mesh["sp"]``: every layer's core attention behind its Ulysses, ring or
   hybrid wrapper, as the variant declares (:attr:`CoreAttention.cp_form`);
3. **activation checkpointing** (a mode of the model's blocks; ``attention_boundary`` never recomputes
   a distributed attention);
4. **data parallel**: DDP or FSDP2 over the (dp, sp) ranks, or nothing when an engine (DeepSpeed)
   owns data parallelism.

Each step reads only the config and the variants' declarations; the order matters: sequence
parallel slices heads inside the tensor-parallel range, and FSDP2 wraps the finished blocks.
"""

from __future__ import annotations

import torch
from longshard.models.model import Transformer
from longshard.parallel.data_parallel import data_parallel
from longshard.parallel.layout import CommCounter, SeqShard
from longshard.parallel.ring import apply_ring
from longshard.parallel.tensor_parallel import apply_tensor_parallel
from longshard.parallel.ulysses import apply_ulysses
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def seq_shard(mesh: DeviceMesh, sp_mode: str) -> SeqShard | None:
    """This rank's place in its sequence-parallel group (None without sequence parallelism).

    Args:
        mesh: the mesh of :func:`~longshard.parallel.env.build_mesh`.
        sp_mode: ``ulysses`` (contiguous shards), ``ring`` or ``hybrid`` (zigzag).
    """
    sp = mesh["sp"]
    if sp.size() == 1:
        return None
    names = mesh.mesh_dim_names or ()
    uly = mesh["uly"].size() if "uly" in names else 1
    rank = mesh["ring"].get_local_rank() * uly + mesh["uly"].get_local_rank() if uly > 1 else sp.get_local_rank()
    return SeqShard(sp.get_group(), rank, sp.size(), zigzag=sp_mode != "ulysses", inner=uly)


def apply_sequence_parallel(model: Transformer, mesh: DeviceMesh, sp_mode: str,
                            counter: CommCounter | None = None) -> None:
    """Put every layer's core attention behind the ``sp_mode`` wrapper over the mesh's sequence group
    (in place; a no-op without sequence parallelism). Also used to wrap a second copy of the cores
    the same way (the dense reference of a conversion).

    Raises:
        ConfigError: a variant with no form for ``sp_mode`` (see :func:`~longshard.parallel.ring.ring_form`).
    """
    if mesh["sp"].size() == 1:
        return
    if sp_mode == "ulysses":
        apply_ulysses(model, mesh["sp"].get_group(), counter)
    elif sp_mode == "ring":
        apply_ring(model, mesh["sp"].get_group(), counter)
    elif sp_mode == "hybrid":
        apply_ring(model, mesh["ring"].get_group(), counter, ulysses_group=mesh["uly"].get_group())
    else:
        raise ValueError(f"unknown sp_mode {sp_mode!r}: use ulysses, ring or hybrid")


def parallelize(model: Transformer, mesh: DeviceMesh, par, comm: CommCounter | None = None, *,
                activation_checkpointing: str = "none", dtype: torch.dtype | None = None,
                data_parallel_wrap: bool = True) -> tuple[nn.Module, SeqShard | None]:
    """Apply tensor, sequence and data parallelism and activation checkpointing to ``model``.

    Args:
        model: the single-device model, on its device, the same on every rank.
        mesh: the mesh of :func:`~longshard.parallel.env.build_mesh` (``dp``, ``sp``, maybe ``ring``/``uly``,
            ``tp``).
        par: the ``parallel`` config section (``sp_mode``, ``dp_mode``, degrees).
        comm: counter of the sequence-parallel wrappers' traffic.
        activation_checkpointing: ``none``, ``full`` or ``attention_boundary``.
        dtype: compute dtype of a mixed-precision run (FSDP2 gathers parameters in it), or None (fp32).
        data_parallel_wrap: False when an engine (DeepSpeed) does data parallelism itself.

    Returns:
        (the module to train: DDP / FSDP2 module / the model itself, this rank's sequence shard or None).
    """
    names = mesh.mesh_dim_names or ()
    if "tp" in names and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    apply_sequence_parallel(model, mesh, par.sp_mode, comm)
    model.set_activation_checkpointing(activation_checkpointing)
    wrapped = data_parallel(model, mesh, par.dp_mode, dtype) if data_parallel_wrap else model
    return wrapped, seq_shard(mesh, par.sp_mode)
