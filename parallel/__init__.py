"""Parallelism applied from outside the model: process groups, meshes, data parallel wrappers,
all applied by :func:`parallelize` in a fixed order."""

from longshard.parallel.apply import apply_sequence_parallel, parallelize, seq_shard
from longshard.parallel.data_parallel import clip_grad_norm, data_parallel, gradient_sync, unwrap
from longshard.parallel.env import DistEnv, build_mesh, destroy_distributed, exit_worker, init_distributed, mesh_shape

__all__ = [
    "DistEnv",
    "apply_sequence_parallel",
    "build_mesh",
    "clip_grad_norm",
    "data_parallel",
    "destroy_distributed",
    "exit_worker",
    "gradient_sync",
    "init_distributed",
    "mesh_shape",
    "parallelize",
    "seq_shard",
    "unwrap",
]
