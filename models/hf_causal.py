"""A transformers causal LM as the model longshard's trainer runs (``init.hf_model: transformers``).

Any architecture transformers knows (Mistral, Gemma, Phi-3, ... not only the Llama / Qwen ones
:mod:`longshard.models.hf` converts) is built by transformers from a local folder's ``config.json``
and weights, with each layer's attention run by longshard's backend
(:mod:`longshard.models.hf_attention`, the same registered variants) and the parameters a variant
adds attached by :func:`longshard.models.hf_swap.add_longshard_attention` (identity-preserving
initialisation). :class:`HFCausalLM` gives it the surface the trainer, ``parallel/`` and the metrics
read of our own :class:`~longshard.models.model.Transformer`:

- ``forward(tokens_BS, position_ids_BS=, doc_ids_BS=, labels_BS=, want_correct=)``: logits, or our
  chunked loss head (:func:`~longshard.models.model.chunked_lm_loss`) on the decoder's hidden states;
  documents reach the attention as ids (``attn_implementation="longshard_ids"``: transformers builds no
  mask, so a packed 32K batch never materialises S x S);
- ``layers``: the decoder layers, each with an ``attention`` view (heads, and its core attention, read
  and replaced through the backend) so the same :func:`~longshard.parallel.ulysses.apply_ulysses`,
  :func:`~longshard.parallel.ring.apply_ring` and FSDP2 wrapping apply unchanged;
- ``aux_losses()``, ``set_activation_checkpointing`` (``none`` / ``full``: transformers' own
  non-reentrant checkpointing), ``set_loss_chunking``, ``dense_reference()`` (the checkpoint as it ran:
  dense, gates at their exact starting value; the conversion gap).

``cfg`` is a :class:`~longshard.models.config.ModelConfig` describing the shapes (heads, widths,
context) for layout checks, FLOPs and memory plans; transformers' config decides the forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from longshard.errors import ConfigError
from longshard.models.attention import AttentionSpec
from longshard.models.attention.registry import AttentionContext, CoreAttention
from longshard.models.config import ModelConfig, RopeConfig
from longshard.models.hf import _HalfGate, _hf_num, check_weight_file, weight_files
from longshard.models.model import (
    LOSS_CHUNK_BYTES,
    LossOutput,
    chunked_lm_loss,
    layer_aux_losses,
    positions_from_docs,
)
from torch import nn

log = logging.getLogger(__name__)

# RoPE extension by init.rope_scaling -> transformers' rope_type (static NTK has no transformers form)
ROPE_TYPES = {"linear": "linear", "yarn": "yarn", "llama3": "llama3"}
# config keys that change the logits after the decoder (our loss head reads the output matrix directly)
_LOGIT_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _spec_dict(spec: AttentionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "options": dict(spec.options)}
    if spec.gate != "none":
        out["gate"] = spec.gate
    return out


def _heads(config: Any) -> tuple[int, int]:
    H = int(config.num_attention_heads)
    return H, int(getattr(config, "num_key_value_heads", None) or H)


def model_config(hf: dict[str, Any], attention: list[AttentionSpec], rope_scaling: str = "keep",
                 rope_factor: float = 1.0) -> ModelConfig:
    """The shapes of a transformers checkpoint's ``config.json`` (any architecture) as a :class:`ModelConfig`
    for layout checks, FLOPs and memory plans, with the recipe's attention and RoPE extension.

    Raises:
        ConfigError: a key the shapes need is missing or not a number, or a RoPE extension transformers
            has no form for.
    """
    if rope_scaling not in ("keep", *ROPE_TYPES):
        raise ConfigError("init.rope_scaling", f"{rope_scaling!r} has no transformers form (init.hf_model="
                          "transformers runs transformers' own RoPE).", f"use keep or one of {', '.join(ROPE_TYPES)}.")
    n_heads = _hf_num(hf, "num_attention_heads", int)
    dim = _hf_num(hf, "hidden_size", int)
    max_len = _hf_num(hf, "max_position_embeddings", int, 2048)
    factor = rope_factor if rope_scaling != "keep" else 1.0
    return ModelConfig(
        vocab_size=_hf_num(hf, "vocab_size", int), dim=dim, n_layers=_hf_num(hf, "num_hidden_layers", int),
        n_heads=n_heads, n_kv_heads=_hf_num(hf, "num_key_value_heads", int, n_heads),
        head_dim=_hf_num(hf, "head_dim", int, dim // max(n_heads, 1)),
        ffn_hidden_dim=_hf_num(hf, "intermediate_size", int, None),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), max_seq_len=int(max_len * factor),
        rope=RopeConfig(), attention=list(attention) if attention else [AttentionSpec()],
    )


def check_files(path: str | Path) -> None:
    """Check every weight file of the folder (headers, pickle opcodes) before transformers reads one."""
    for f in weight_files(Path(path)):
        check_weight_file(f)


class _AttentionView:
    """What ``parallel/`` and ``train/`` read of one layer's attention in a transformers model: its heads
    and its core attention (read and replaced through :mod:`longshard.models.hf_attention`)."""

    def __init__(self, module: nn.Module, n_heads: int, n_kv_heads: int, model_dim: int, n_layers: int) -> None:
        self.module, self.n_heads, self.n_kv_heads = module, n_heads, n_kv_heads
        self.head_offset = 0  # tensor parallel is not applied to transformers models
        self.ctx = AttentionContext(layer_idx=int(module.layer_idx), n_layers=n_layers, n_heads=n_heads,
                                    n_kv_heads=n_kv_heads, head_dim=int(module.head_dim), model_dim=model_dim)

    @property
    def core_attention(self) -> CoreAttention:
        from longshard.models import hf_attention

        return hf_attention.running_core(self.module, self.n_heads, self.n_kv_heads)

    @core_attention.setter
    def core_attention(self, core: CoreAttention) -> None:
        from longshard.models import hf_attention

        hf_attention.set_layer_core(self.module, core)


def decoder_layers(hf: nn.Module) -> list[nn.Module]:
    """The decoder layers of the transformers causal LM ``hf``, each given an ``attention`` view of its
    self-attention (heads; the core attention read and replaced through the backend): what
    :func:`~longshard.parallel.ulysses.apply_ulysses` and :func:`~longshard.parallel.ring.apply_ring` read.

    Raises:
        ConfigError: the decoder does not have one self-attention with q/k/v/o projections per layer.
    """
    from longshard.models import hf_swap

    config = hf.config
    H, Hkv = _heads(config)
    found = hf_swap.attention_modules(hf)
    blocks = list(getattr(hf.get_decoder(), "layers", []))
    if len(found) != int(config.num_hidden_layers) or len(blocks) != len(found):
        raise ConfigError("init.hf_model", f"{type(hf).__name__}: found {len(blocks)} decoder layers and "
                          f"{len(found)} attention modules with q/k/v/o projections for "
                          f"{config.num_hidden_layers} layers.", "use init.hf_model=convert, or a decoder with "
                          "one self-attention (q_proj, k_proj, v_proj, o_proj) per layer.")
    for block, module in zip(blocks, found, strict=True):
        if not isinstance(getattr(block, "attention", None), _AttentionView):
            block.attention = _AttentionView(module, H, Hkv, int(config.hidden_size), len(blocks))
    return blocks


class HFCausalLM(nn.Module):
    """A transformers causal LM run by longshard's trainer (see the module docstring).

    Args:
        hf: the transformers model (its attention implementation ``longshard_ids``).
        cfg: its shapes (:func:`model_config`).
    """

    def __init__(self, hf: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        from longshard.models import hf_attention

        self.hf, self.cfg = hf, cfg
        config = hf.config
        for key in _LOGIT_KEYS:
            if getattr(config, key, None) not in (None, 1, 1.0):
                raise ConfigError("init.hf_path", f"config.json: {key}={getattr(config, key)!r} changes the logits "
                                  "after the decoder, which longshard's loss head does not apply.",
                                  "use init.hf_model=convert for a converted architecture, or a model without it.")
        head = hf.get_output_embeddings()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ConfigError("init.hf_path", f"{type(hf).__name__}'s output layer is {type(head).__name__}"
                              f"{' with a bias' if isinstance(head, nn.Linear) else ''}, not a plain linear map.",
                              "use a causal LM whose lm_head is a Linear without bias.")
        self.__dict__["_blocks"] = decoder_layers(hf)  # reached through hf already: not registered a second time
        hf.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION_IDS)
        self.activation_checkpointing = "none"
        self.activation_offload = None  # longshard's offload hooks live in its own attention module
        self.loss_chunk_tokens: int | None = 0

    def _loose_modules(self) -> list[nn.Module]:
        """Modules of the running cores that are not submodules (a parameter-free variant's core and the
        sequence-parallel wrappers live beside the transformers model, not inside it)."""
        seen = {id(m) for m in self.modules()}
        loose = []
        for block in self.layers:
            for m in block.attention.core_attention.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    loose.append(m)
        return loose

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """``to`` / ``cuda`` / dtype casts reach the running cores' buffers too."""
        super()._apply(fn, recurse)
        for m in self._loose_modules():
            m._apply(fn, recurse=False)
        return self

    def train(self, mode: bool = True) -> HFCausalLM:
        """Training mode for the model and the running cores."""
        super().train(mode)
        for m in self._loose_modules():
            m.training = mode
        return self

    @property
    def layers(self) -> list[nn.Module]:
        """The decoder layers (each with an ``attention`` view)."""
        return self._blocks

    @property
    def output(self) -> nn.Linear:
        """The output projection (``lm_head``)."""
        return self.hf.get_output_embeddings()

    def aux_losses(self) -> dict[int, torch.Tensor]:
        """Each layer's auxiliary loss recorded in the last forward (MoH's balance, a gate penalty); cleared."""
        return layer_aux_losses(self.layers)

    def set_activation_checkpointing(self, mode: str) -> None:
        """``none`` or ``full`` (transformers' non-reentrant checkpointing of every decoder layer)."""
        if mode not in ("none", "full"):
            raise ConfigError("train.activation_checkpointing", f"{mode} is not available for a transformers model.",
                              "use full or none with init.hf_model=transformers.")
        if mode == "full":
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.activation_checkpointing == "full":
            self.hf.gradient_checkpointing_disable()
        self.activation_checkpointing = mode

    def set_loss_chunking(self, chunk_tokens: int | None) -> None:
        """As :meth:`Transformer.set_loss_chunking`: 0 = auto, n tokens per chunk, None = one pass."""
        self.loss_chunk_tokens = chunk_tokens

    def set_activation_offload(self, mode: str) -> None:
        """Only ``none``: the offload hooks live in longshard's own attention module."""
        if mode != "none":
            raise ConfigError("train.activation_offload", f"{mode} is not available for a transformers model.",
                              "use train.activation_offload=none with init.hf_model=transformers.")

    def forward(self, tokens_BS: torch.Tensor, *, position_ids_BS: torch.Tensor | None = None,
                doc_ids_BS: torch.Tensor | None = None, cache: Any = None, labels_BS: torch.Tensor | None = None,
                want_correct: bool = False) -> torch.Tensor | LossOutput:
        """Logits (B, S, vocab), or with ``labels_BS`` the loss head's :class:`LossOutput`.

        Args:
            tokens_BS: token ids.
            position_ids_BS: RoPE positions; default restarts per document.
            doc_ids_BS: document index per token (None = one document per row).
            cache: must be None (decoding runs through transformers' ``generate``).
            labels_BS: targets (``IGNORE_INDEX`` = no loss): the summed loss, chunk by chunk.
            want_correct: with labels, also where the argmax prediction equals the label.
        """
        if cache is not None:
            raise ValueError("a transformers model decodes with its own cache (generate), not longshard's")
        B, S = tokens_BS.shape
        if position_ids_BS is None:
            position_ids_BS = positions_from_docs(doc_ids_BS) if doc_ids_BS is not None else \
                torch.arange(S, device=tokens_BS.device).expand(B, S)
        h = self.hf.get_decoder()(input_ids=tokens_BS, position_ids=position_ids_BS, use_cache=False,
                                  longshard_doc_ids=doc_ids_BS).last_hidden_state
        weight = self.output.weight
        if labels_BS is None:
            return torch.nn.functional.linear(h, weight)
        chunk = self.loss_chunk_tokens
        if chunk == 0:
            chunk = max(1, LOSS_CHUNK_BYTES // (4 * weight.shape[0]))
        return chunked_lm_loss(h, weight, labels_BS, chunk, want_correct)

    @contextmanager
    def dense_reference(self) -> Iterator[HFCausalLM]:
        """Temporarily run every layer as the checkpoint did: dense attention, and each output gate fixed
        at the 1/2 that, with ``o_proj`` doubled when it was added, is the original projection; the dense
        cores replace the running ones (wrap them for sequence parallelism inside the block)."""
        from longshard.models.attention.dense import DenseAttention, DenseOptions

        saved = []
        for block in self.layers:
            view = block.attention
            parts = view.module._modules.get("longshard")
            wg = parts.wg if parts is not None else None
            saved.append((view, view.core_attention, parts, wg))
            view.core_attention = DenseAttention(view.ctx, DenseOptions())
            if wg is not None:
                parts.wg = _HalfGate(wg.out_features)
        try:
            yield self
        finally:
            for view, core, parts, wg in saved:
                view.core_attention = core
                if wg is not None:
                    parts.wg = wg


def build(path: str | Path, mcfg: ModelConfig, rope_scaling: str = "keep", rope_factor: float = 1.0,
          weights: bool = True) -> HFCausalLM:
    """The transformers model of the local folder ``path`` with its weights (fp32), ``mcfg.attention`` in
    every layer (parameters a variant adds initialised to start where the checkpoint is) and the RoPE
    extension, as an :class:`HFCausalLM`.

    Nothing is downloaded and no code from the folder runs (``local_files_only``, no remote code); a
    weight the model expects and the folder lacks is a ConfigError naming it. ``weights=False`` reads
    only config.json (a longshard checkpoint's weights are loaded next).
    """
    from longshard.models import hf_attention, hf_swap
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if weights:
        check_files(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError("init.hf_path", f"transformers cannot build a config from {path}/config.json: "
                          f"{str(e)[:300]}", "give a folder transformers knows the model_type of (no remote "
                          "code is run).") from None
    specs = [_spec_dict(mcfg.layer_attention(i)) for i in range(mcfg.n_layers)]
    setattr(config, hf_attention.CONFIG_FIELD, specs)
    if rope_scaling != "keep":
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError("init.rope_scaling", f"the checkpoint already uses {rope['rope_type']} RoPE scaling.",
                              "use init.rope_scaling=keep, or start from an unscaled checkpoint.")
        original = int(config.max_position_embeddings)
        rope.update(rope_type=ROPE_TYPES[rope_scaling], factor=float(rope_factor),
                    original_max_position_embeddings=original)
        config.rope_parameters = rope
        config.max_position_embeddings = int(original * rope_factor)
    if not weights:
        hf = AutoModelForCausalLM.from_config(config, attn_implementation=hf_attention.ATTN_IMPLEMENTATION_IDS,
                                              dtype=torch.float32, trust_remote_code=False)
        hf_swap.add_longshard_attention(hf, implementation=hf_attention.ATTN_IMPLEMENTATION_IDS)
        return HFCausalLM(hf.train(), mcfg)
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report is read below
    hf_logging.disable_progress_bar()
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, attn_implementation=hf_attention.ATTN_IMPLEMENTATION_IDS, dtype=torch.float32,
            local_files_only=True, trust_remote_code=False, output_loading_info=True)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError("init.hf_path", f"transformers cannot load {path}: {str(e)[:300]}",
                          "give a local causal-LM folder transformers supports.") from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        bad = missing or [str(m) for m in info["mismatched_keys"]]
        raise ConfigError("init.hf_path", f"{path} lacks (or misshapes) weights the model needs: "
                          f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}.",
                          "give the folder the weights were saved in, with its config.json.")
    if info.get("unexpected_keys"):
        log.warning("%s holds weights %s builds no parameter for (ignored): %s", path, type(hf).__name__,
                    ", ".join(sorted(info["unexpected_keys"])[:4]))
    hf_swap.add_longshard_attention(hf, implementation=hf_attention.ATTN_IMPLEMENTATION_IDS)
    return HFCausalLM(hf.train(), mcfg)
