"""Parallelism applied from outside the model: process groups, meshes, data parallel wrappers."""

from longshard.parallel.data_parallel import clip_grad_norm, gradient_sync, parallelize, unwrap
from longshard.parallel.env import DistEnv, build_mesh, destroy_distributed, exit_worker, init_distributed, mesh_shape

__all__ = [
    "DistEnv",
    "build_mesh",
    "clip_grad_norm",
    "destroy_distributed",
    "exit_worker",
    "gradient_sync",
    "init_distributed",
    "mesh_shape",
    "parallelize",
    "unwrap",
]
