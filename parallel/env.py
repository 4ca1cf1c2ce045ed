"""Process-group set-up: gloo on CPU, NCCL on CUDA, single process without a launcher."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from longshard.errors import ConfigError
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits.

    Args:
        rank, world_size, local_rank: from the launcher (0, 1, 0 without one).
        device: the torch device this rank computes on.
        backend: process-group backend in use.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(kind: str, local_rank: int) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device", "cuda was requested but no GPU is visible.", "use train.device=auto.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_kind: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Initialise (or reuse) the default process group from torchrun-style environment variables.

    Without ``WORLD_SIZE`` in the environment a one-process group is created in memory, so the
    same code path (DDP/FSDP2, DCP) runs under ``python`` and under ``torchrun``.

    Args:
        device_kind: ``auto``, ``cpu`` or ``cuda``.
        timeout_s: collective timeout; a hung peer raises instead of waiting forever.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_kind, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def mesh_shape(world_size: int, sp: int = 1, tp: int = 1) -> tuple[int, int]:
    """(dp, sp) for ``world_size`` ranks (``tp`` more per sequence rank); raises before any collective
    when sp x tp does not divide it."""
    if sp < 1 or tp < 1 or world_size % (sp * tp) != 0:
        field = "parallel.sp_degree" if tp == 1 else "parallel.tp_degree"
        raise ConfigError(field, f"sp_degree={sp} x tp_degree={tp} does not divide the world size {world_size}.",
                          "launch a multiple of sp_degree x tp_degree processes.")
    return world_size // (sp * tp), sp


def check_tp_heads(n_heads: int, n_kv_heads: int, tp: int, where: str = "") -> None:
    """Raise a :class:`ConfigError` naming ``parallel.tp_degree`` when ``tp`` does not divide the query and
    the KV heads (tensor parallelism gives each rank whole heads of both). The one check of it: config
    validation, the layout check after an HF config is resolved, and the model's own split use it.

    Args:
        where: what the heads belong to, for the message (e.g. "of layer 3").
    """
    if n_heads % tp or n_kv_heads % tp:
        raise ConfigError("parallel.tp_degree", f"{n_heads} query / {n_kv_heads} KV heads{where and ' ' + where} "
                          f"do not split over tp_degree={tp}.", "choose a tp_degree dividing both.")


def build_mesh(env: DistEnv, sp: int = 1, ulysses: int = 1, tp: int = 1) -> DeviceMesh:
    """A DeviceMesh (``dp``, ``sp``) over all ranks; consecutive ranks share a sequence group.

    With ``ulysses > 1`` (hybrid) the mesh is (``dp``, ``ring``, ``uly``) and ``sp`` is the
    flattened (ring, uly) dimension. With ``tp > 1`` a last ``tp`` dimension is added (tensor
    parallel ranks are neighbours, i.e. on the same node, as in Megatron).

    Args:
        env: this process's :class:`DistEnv`.
        sp: sequence-parallel degree (1 = pure data parallel).
        ulysses: Ulysses group size inside the sequence-parallel group (hybrid 2-D).
        tp: tensor-parallel degree.
    """
    dp, sp = mesh_shape(env.world_size, sp, tp)
    extra = ((tp,), ("tp",)) if tp > 1 else ((), ())
    if ulysses <= 1:
        return init_device_mesh(env.device.type, (dp, sp, *extra[0]), mesh_dim_names=("dp", "sp", *extra[1]))
    mesh = init_device_mesh(env.device.type, (dp, sp // ulysses, ulysses, *extra[0]),
                            mesh_dim_names=("dp", "ring", "uly", *extra[1]))
    mesh["ring", "uly"]._flatten("sp")
    return mesh


def destroy_distributed() -> None:
    """Tear down the default process group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device | None:
    """Where a scalar for a collective lives: the current CUDA device under NCCL, else CPU (None)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def all_agree(ok: bool, device: torch.device | None = None) -> bool:
    """True when every rank says ``ok`` (an all-reduce MIN of the verdicts; the local verdict without
    a process group). ``device``: where the flag lives (default: the current CUDA device under NCCL,
    else CPU)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device or _collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_sum(value: float, device: torch.device | None = None) -> float:
    """Sum of ``value`` over all ranks (fp64 all-reduce; the local value without a process group).
    ``device`` as for :func:`all_agree`."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=device or _collective_device())
    dist.all_reduce(total)
    return float(total.item())


def exit_worker(rc: int) -> None:
    """End a launcher-started worker with ``rc`` once its process group is destroyed.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) logs and streams are flushed and the process leaves
    through ``os._exit``: interpreter teardown can otherwise abort a finished run
    ("terminate called without an active exception", SIGABRT) while c10d/gloo threads are still
    being destroyed, and torchrun would then report a completed job as failed. A single process
    exits normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(rc)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to flush into
            pass
    os._exit(rc)
