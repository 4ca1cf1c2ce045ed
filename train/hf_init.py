"""Weights from a Hugging Face checkpoint (``init.hf_path``): the model built whole or on the meta
device, the checkpoint read (whole before parallelizing, or each rank its shards after FSDP2), what a
conversion adds initialised, and the conversion's loss gap measured once on the parallelized model.

The trainer calls :func:`build_model` first, :func:`load_whole` before ``parallelize`` and
:func:`finish_after_parallelize` after it; nothing else touches the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from longshard.models import hf_causal
from longshard.models.config import ModelConfig
from longshard.models.hf import dense_reference, init_converted, is_conversion, load_hf_state_dict, load_into
from longshard.models.hf_causal import HFCausalLM
from longshard.models.model import Transformer
from longshard.parallel.data_parallel import reshard
from longshard.parallel.layout import SeqShard
from longshard.parallel.sharded_load import hf_names_of, load_hf_sharded, parameters_on_meta
from longshard.train.config import Config
from longshard.train.evaluate import heldout_loss
from longshard.train.precision import compute_dtype

log = logging.getLogger(__name__)


def build_model(cfg: Config, mcfg: ModelConfig, use_ds: bool,
                tp_size: int) -> tuple[Transformer | HFCausalLM, bool]:
    """The model, and whether its HF weights are to be loaded shard by shard after FSDP2 sharding.

    ``init.hf_model=transformers``: transformers builds the model and reads its weights
    (:func:`longshard.models.hf_causal.build`, whole on every rank). Otherwise an HF checkpoint under
    FSDP2 (native engine, no tensor parallel) whose every parameter the
    checkpoint holds is built with its parameters on the meta device: no rank ever holds the whole
    fp32 model (see :mod:`longshard.parallel.sharded_load`). Otherwise the model is built whole.
    """
    if cfg.init.hf_path is not None and cfg.init.hf_model == "transformers":
        return hf_causal.build(cfg.init.hf_path, mcfg, cfg.init.rope_scaling, cfg.init.rope_factor), False
    if cfg.init.hf_path is None or use_ds or cfg.parallel.dp_mode != "fsdp2" or tp_size > 1:
        return Transformer(mcfg), False
    with parameters_on_meta():
        model = Transformer(mcfg)
    if hf_names_of(model) is None:  # the conversion adds parameters (gates, NSA/NOSA weights): initialise whole
        log.info("this conversion adds parameters the checkpoint lacks: loading %s unsharded", cfg.init.hf_path)
        return Transformer(mcfg), False
    return model, True


def load_whole(model: Transformer | HFCausalLM, cfg: Config, mcfg: ModelConfig) -> None:
    """Read the whole checkpoint into ``model`` and initialise what the conversion adds (output gates
    exact: :func:`~longshard.models.hf.init_converted`). Before ``parallelize``: tensor parallelism and
    DeepSpeed take the model as it is then. A transformers model read its weights when it was built."""
    if isinstance(model, HFCausalLM):
        return
    load_into(model, load_hf_state_dict(cfg.init.hf_path, mcfg), cfg.init.hf_path)
    init_converted(model)


def finish_after_parallelize(dmodel: torch.nn.Module, model: Transformer | HFCausalLM, cfg: Config, *,
                             sharded: bool, val_ds,
                             device: torch.device, sp: SeqShard | None,
                             wrap_reference: Callable[[torch.nn.Module], None] | None) -> dict[str, float] | None:
    """After ``parallelize``: each rank reads its shards of the checkpoint (``sharded``), then the
    conversion's loss gap is measured on the model as it will train.

    Returns ``{"original_loss", "converted_loss", "loss_gap"}`` on ``init.conversion_eval_batches``
    held-out batches, or None (no checkpoint, not a conversion, or no held-out data). The original is
    the same weights run as the checkpoint ran them (:func:`~longshard.models.hf.dense_reference`),
    its dense cores put behind the run's sequence-parallel wrapping by ``wrap_reference``.

    Args:
        dmodel: the module the loop runs (DDP / FSDP2 module / DeepSpeed engine).
        model: the :class:`Transformer` (or :class:`HFCausalLM`) inside it.
        cfg: the run's config.
        sharded: the model was built on the meta device (:func:`build_model`).
        val_ds: held-out windows of ``train.seq_len`` tokens, or None.
        device: this rank's device.
        sp: this rank's sequence shard, or None.
        wrap_reference: puts a model's cores behind the run's sequence-parallel wrapper (None: no SP).
    """
    if cfg.init.hf_path is None:
        return None
    if sharded:
        load_hf_sharded(dmodel, cfg.init.hf_path, device)
        log.info("read %s: loaded sharded (each rank its own shards)", cfg.init.hf_path)
    if not is_conversion(model.cfg):
        return None
    n = cfg.init.conversion_eval_batches
    if val_ds is None or n <= 0 or len(val_ds) == 0:
        log.info("converted %s; no held-out data to measure the initial loss gap", cfg.init.hf_path)
        return None

    def loss() -> float:
        return heldout_loss(dmodel, val_ds, n, cfg.train.micro_batch_size, device, compute_dtype(cfg.train.dtype),
                            cfg.data.doc_mask, sp)

    was_training = dmodel.training
    dmodel.eval()
    with model.dense_reference() if isinstance(model, HFCausalLM) else dense_reference(model):
        if wrap_reference is not None:
            wrap_reference(model)
        original = loss()
    converted = loss()
    dmodel.train(was_training)
    reshard(dmodel)  # a forward outside training leaves FSDP2's root parameters gathered
    log.info("converted %s: held-out loss %.4f with its own attention, %.4f converted (gap %+.4f)",
             cfg.init.hf_path, original, converted, converted - original)
    return {"original_loss": original, "converted_loss": converted, "loss_gap": converted - original}
