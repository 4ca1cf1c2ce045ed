"""Megatron-style tensor parallelism for the single-device model, applied from outside with DTensor.

Each block's q/k/v projections (and the output gate) are split by output columns, i.e. by heads,
and ``wo`` by input rows (one all-reduce after attention); the SwiGLU ``w1``/``w3`` by columns
and ``w2`` by rows (one all-reduce after the MLP), as in Megatron-LM and torchtitan
(``torch.distributed.tensor.parallel``). Each tensor-parallel rank then runs its contiguous
slice of the query heads and KV heads; the core attention is sliced to the same heads with
``set_head_slice``, so per-head patterns (S2 phases, streaming heads, linear decays) keep their
global head index. Embeddings, norms and the output layer stay replicated.

Sequence parallel composes: Ulysses and hybrid slice the tensor-parallel rank's heads further,
ring variants work on them unchanged.
"""

from __future__ import annotations

from longshard.errors import ConfigError, require
from longshard.models.model import Transformer
from longshard.parallel.env import check_tp_heads
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def check_tensor_parallel(model: Transformer, tp: int) -> None:
    """Raise before any collective when the model cannot be split over ``tp`` ranks.

    Raises:
        ConfigError: query or KV heads not divisible by ``tp``, or a core attention with its own
            parameters (``nsa``, ``nosa``, ``streaming_gated``: their per-head parameters
            would need a tensor-parallel gradient reduction of their own).
    """
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        check_tp_heads(attn.n_heads, attn.n_kv_heads, tp, f"of layer {i}")
        problem = attn.core_attention.tensor_parallel_problem()
        if problem is not None:
            raise ConfigError("parallel.tp_degree", f"layer {i}: {problem}, which tensor parallelism does not "
                              "split.", "use tp_degree=1 (sequence parallel handles this variant).")
    require(model.layers[0].feed_forward.w1.out_features % tp == 0, "parallel.tp_degree",
            f"the FFN width {model.layers[0].feed_forward.w1.out_features} does not split over {tp}.")


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> Transformer:
    """Split every block's attention heads and FFN over ``tp_mesh`` (in place).

    Args:
        model: the single-device model (on its device, identical on every rank).
        tp_mesh: the 1-D tensor-parallel mesh.

    Raises:
        ConfigError: see :func:`check_tensor_parallel`.
    """
    T, t = tp_mesh.size(), tp_mesh.get_local_rank()
    check_tensor_parallel(model, T)
    for layer in model.layers:
        attn = layer.attention
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel()}
        if attn.wg is not None:
            plan["attention.wg"] = ColwiseParallel()
        parallelize_module(layer, tp_mesh, plan)
        H = attn.n_heads // T
        attn.set_head_range(t * H, (t + 1) * H)  # sequence parallel slices further inside this range
    return model
