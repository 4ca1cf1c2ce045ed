"""The sections of a run's configuration (``data``, ``optim``, ``train``, ``parallel``, ``deepspeed``,
``checkpoint``, ``logging``, ``eval``, ``init``): typed dataclasses, each validated when built.
:mod:`longshard.train.config` assembles them into a :class:`~longshard.train.config.Config`."""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from pathlib import Path

from longshard.errors import require, require_positive
from longshard.files import check_path_names
from longshard.models.activation_offload import ACTIVATION_OFFLOAD_MODES
from longshard.models.model import AC_MODES

# False while a config is built only to plan (`longshard plan`): the data need not exist on this machine
_CHECK_FILES: contextvars.ContextVar[bool] = contextvars.ContextVar("check_files", default=True)

DATA_SOURCES = ("default", "prepared", "passkey", "mqar")
DTYPES = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "wsd", "constant")
DP_MODES = ("ddp", "fsdp2")
SP_MODES = ("ulysses", "ring", "hybrid", "auto")
WANDB_MODES = ("offline", "online", "disabled")
NAN_POLICIES = ("stop", "skip")
MAX_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600  # what a process group's timeout can hold without overflow, and then some
DEVICES = ("auto", "cpu", "cuda")
INIT_ROPE = ("keep", "linear", "ntk", "yarn", "llama3")
HF_MODELS = ("convert", "transformers")


def _choice(value: str, choices: tuple[str, ...], name: str) -> None:
    require(value in choices, name, f"{value!r} is not a valid choice.", f"use one of: {', '.join(choices)}.")


@dataclass(kw_only=True)
class DataConfig:
    """Training data.

    Args:
        source: ``default`` (embedded stdlib corpus, prepared on first use), ``prepared`` (a folder
            made by ``longshard data prepare``), ``passkey`` or ``mqar`` (synthetic tasks).
        path: prepared folder for ``source=prepared``.
        tokenizer: local tokenizer.json for synthetic tasks and evaluation; byte-level when unset.
        default_corpus_bytes: how much of the default corpus to prepare.
        doc_mask: give the model document ids so packed documents never attend to each other.
        shuffle: reshuffle every epoch (deterministic from ``train.seed``).
        mqar_num_kv_pairs: key/value pairs per MQAR sequence.
        mqar_curriculum: MQAR sequence-length warmup (as DeepSpeed's seqlen curriculum): document
            lengths, ascending, the last = ``train.seq_len``, each one phase of equal share of
            ``train.steps``. In a phase every sequence packs ``seq_len / L`` independent MQAR documents
            of ``L`` tokens (document-masked) with ``mqar_num_kv_pairs * L / seq_len`` pairs each, so
            recall is learned at short range first. The samples are then read in order (each is drawn
            from its index alone; shuffling would only mix the phases). Empty: full length throughout.
        synthetic_samples: size of a synthetic dataset.
    """

    source: str = "default"
    path: str | None = None
    tokenizer: str | None = None
    default_corpus_bytes: int = 3_000_000
    doc_mask: bool = True
    shuffle: bool = True
    mqar_num_kv_pairs: int = 8
    mqar_curriculum: list[int] = field(default_factory=list)
    synthetic_samples: int = 100_000

    def __post_init__(self) -> None:
        _choice(self.source, DATA_SOURCES, "data.source")
        require_positive(self.default_corpus_bytes, "data.default_corpus_bytes")
        require_positive(self.mqar_num_kv_pairs, "data.mqar_num_kv_pairs")
        require_positive(self.synthetic_samples, "data.synthetic_samples")
        for name in ("path", "tokenizer"):
            if getattr(self, name):
                check_path_names(getattr(self, name), f"data.{name}")
        if self.source == "prepared":
            require(bool(self.path), "data.path", "is required with data.source=prepared.",
                    "set data.path to a folder made by `longshard data prepare`.")
            require(not _CHECK_FILES.get() or Path(self.path).is_dir(), "data.path", f"{self.path} does not exist.",
                    "run `longshard data prepare --input FILES --output DIR` first.")
        if self.tokenizer and _CHECK_FILES.get():
            require(Path(self.tokenizer).exists(), "data.tokenizer", f"{self.tokenizer} does not exist.")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the learning-rate schedule.

    Args:
        lr: peak learning rate.
        min_lr_ratio: final lr as a fraction of ``lr`` (cosine and WSD).
        weight_decay: decoupled decay (not applied to norms and biases).
        beta1, beta2, eps: Adam constants.
        schedule: ``cosine`` (warmup then cosine), ``wsd`` (warmup-stable-decay) or ``constant``.
        warmup_steps: linear warmup length.
        decay_fraction: share of the steps spent decaying in WSD.
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        require_positive(self.lr, "optim.lr")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}.")
        require(0 <= self.weight_decay < float("inf"), "optim.weight_decay",
                f"must be a finite number >= 0, got {self.weight_decay}.")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, f"optim.{name}", f"must be in [0, 1), got {value}.",
                    "Adam's moment decay rates are below 1 (typical: beta1 0.9, beta2 0.95-0.999).")
        require_positive(self.eps, "optim.eps")
        require(0 < self.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}.")
        _choice(self.schedule, SCHEDULES, "optim.schedule")


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop.

    Args:
        steps: optimizer steps.
        seq_len: tokens per sequence.
        micro_batch_size: sequences per forward pass per rank.
        global_batch_size: sequences per optimizer step over all data-parallel ranks
            (= micro_batch_size x grad accumulation x dp size).
        dtype: ``fp32``, ``bf16`` or ``fp16`` (autocast; master weights stay fp32; fp16 adds dynamic
            loss scaling, native engine only).
        grad_clip: max global gradient norm (0 disables).
        activation_checkpointing: ``none``, ``full`` (recompute each block) or ``attention_boundary``
            (recompute all but the core attention; LightSeq's rematerialisation-aware placement).
        activation_offload: ``none``, ``kv`` (the keys/values the core attentions save for backward
            go to host memory, prefetched in backward) or ``attention`` (everything they save).
        seed: seed for init, data order and dropout-free RNG state.
        nan_policy: on a non-finite loss, ``stop`` with an error or ``skip`` the step.
        engine: ``native`` (our DDP/FSDP2 loop) or ``deepspeed`` (``deepspeed.initialize`` with the
            ``deepspeed`` section: ZeRO 0-3, optimizer offload; same model, data, sequence
            parallelism, schedule and metrics).
        max_skipped_steps: with ``skip``, stop after this many consecutive skipped steps.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        nproc: processes ``longshard train`` starts on this node (torchrun --nproc-per-node).
        peak_tflops: accelerator peak for MFU; detected for known GPUs when unset.
        deterministic: request deterministic algorithms (GPU) for bit-reproducible runs.
        log_every: steps between log lines.
        loss_chunk_tokens: tokens per chunk of the loss head (output projection + cross entropy,
            recomputed in backward; all logits are never held): ``0`` = auto (fp32 logits of one
            chunk <= 256 MB, e.g. 441 tokens at a 152K vocabulary), ``-1`` = one pass over all tokens.
    """

    steps: int = 100
    seq_len: int = 512
    micro_batch_size: int = 1
    global_batch_size: int = 8
    dtype: str = "fp32"
    grad_clip: float = 1.0
    activation_checkpointing: str = "none"
    activation_offload: str = "none"
    seed: int = 0
    nan_policy: str = "stop"
    engine: str = "native"
    max_skipped_steps: int = 10
    device: str = "auto"
    nproc: int = 1
    peak_tflops: float | None = None
    deterministic: bool = False
    log_every: int = 1
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        require(self.loss_chunk_tokens >= -1, "train.loss_chunk_tokens",
                f"must be -1 (one pass), 0 (auto) or a positive token count, got {self.loss_chunk_tokens}.")
        for name in ("steps", "seq_len", "micro_batch_size", "global_batch_size", "nproc", "log_every",
                     "max_skipped_steps"):
            require_positive(getattr(self, name), f"train.{name}")
        require(0 <= self.grad_clip < float("inf"), "train.grad_clip",
                f"must be a finite number >= 0 (0: no clipping), got {self.grad_clip}.")
        require(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}.")
        _choice(self.dtype, DTYPES, "train.dtype")
        _choice(self.activation_checkpointing, AC_MODES,
                "train.activation_checkpointing")
        _choice(self.activation_offload, ACTIVATION_OFFLOAD_MODES, "train.activation_offload")
        require(not (self.activation_offload != "none" and self.activation_checkpointing == "full"),
                "train.activation_offload",
                "activation_checkpointing=full recomputes the attention in backward, so nothing is saved to offload.",
                "use activation_checkpointing=attention_boundary or none with activation_offload.")
        _choice(self.nan_policy, NAN_POLICIES, "train.nan_policy")
        _choice(self.engine, ("native", "deepspeed"), "train.engine")
        _choice(self.device, DEVICES, "train.device")


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is distributed.

    Args:
        dp_mode: ``ddp`` (replicated) or ``fsdp2`` (``fully_shard`` per block).
        sp_degree: sequence-parallel degree; the data-parallel degree is world size / sp_degree.
        sp_mode: ``ulysses`` (all-to-all head sharding around the attention; every variant, with
            selection-based ones (nsa, nosa) needing whole GQA groups per rank), ``ring`` (zigzag
            shards; dense layers rotate K/V around a ring with overlap, block-sparse layers exchange
            only the K/V blocks their pattern reads, linear layers pass their recurrent states) or
            ``hybrid`` (Ulysses inside groups of ``sp_ulysses_degree`` ranks x ring across them;
            the same variants as ring); ``auto``: ring when every layer has a ring form, else ulysses
            (decided when the config is built, logged, and stored resolved).
        sp_ulysses_degree: Ulysses group size of ``hybrid`` (divides sp_degree).
        tp_degree: Megatron-style tensor parallel degree (heads and FFN split over neighbouring
            ranks, :mod:`longshard.parallel.tensor_parallel`); needs ``dp_mode: fsdp2`` and a
            variant without parameters inside its core attention. World size = dp x sp x tp.
        collective_timeout_s: seconds a collective may wait for its peers before it fails with an
            error naming the rank, step and phase (instead of hanging).
    """

    dp_mode: str = "ddp"
    sp_degree: int = 1
    sp_mode: str = "ulysses"
    sp_ulysses_degree: int = 1
    tp_degree: int = 1
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _choice(self.dp_mode, DP_MODES, "parallel.dp_mode")
        require_positive(self.sp_degree, "parallel.sp_degree")
        require(math.isfinite(self.collective_timeout_s) and 0 < self.collective_timeout_s <= MAX_COLLECTIVE_TIMEOUT_S,
                "parallel.collective_timeout_s", f"must be > 0 and at most {MAX_COLLECTIVE_TIMEOUT_S} seconds (a "
                f"week), got {self.collective_timeout_s}.", "give a finite number of seconds, e.g. 600.")
        _choice(self.sp_mode, SP_MODES, "parallel.sp_mode")
        require_positive(self.tp_degree, "parallel.tp_degree")
        if self.sp_mode == "hybrid":
            u = self.sp_ulysses_degree
            require(1 < u < self.sp_degree and self.sp_degree % u == 0, "parallel.sp_ulysses_degree",
                    f"{u} must divide sp_degree={self.sp_degree} and lie strictly between 1 and it.",
                    "e.g. sp_degree=8 sp_ulysses_degree=4 (Ulysses inside a node, ring across nodes).")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """DeepSpeed engine settings, used when ``train.engine: deepspeed``.

    Args:
        zero_stage: ZeRO stage 0-3 (optimizer states / + gradients / + parameters partitioned).
        offload_optimizer: keep optimizer states on host memory (ZeRO-Offload; stage >= 1).
        config_file: a DeepSpeed JSON config merged under ours; it may add any DeepSpeed key, but
            the keys longshard derives from the recipe (batch sizes, clipping, ZeRO stage) must
            agree with the recipe when it sets them.
    """

    zero_stage: int = 1
    offload_optimizer: bool = False
    config_file: str | None = None

    def __post_init__(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0-3, got {self.zero_stage}.")
        require(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer",
                "needs zero_stage >= 1.", "set deepspeed.zero_stage=1 (or higher).")
        if self.config_file is not None:
            check_path_names(self.config_file, "deepspeed.config_file")
            require(not _CHECK_FILES.get() or Path(self.config_file).is_file(), "deepspeed.config_file",
                    f"{self.config_file} does not exist.",
                    "give the path of a DeepSpeed JSON config.")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints (torch.distributed.checkpoint, written atomically).

    Args:
        dir: folder; default ``<output_dir>/checkpoints``.
        every: steps between checkpoints (0 = only the final one).
        keep_last: complete checkpoints kept (older ones are deleted).
        resume: ``auto`` (newest complete checkpoint in ``dir``, if any), ``none``, or a path.
        save_final: write a checkpoint after the last step.
        allow_changes: settings that may differ from the checkpoint's on resume and then take
            effect (the new lr reaches the optimizer and scheduler): any of ``CHANGEABLE`` (e.g.
            ``[optim.lr, train.seq_len]``; ``data`` for another corpus). Anything else that differs
            is refused before loading; the model itself can never change.
    """

    dir: str | None = None
    every: int = 0
    keep_last: int = 2
    resume: str = "auto"
    save_final: bool = True
    allow_changes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from longshard.train.fingerprint import CHANGEABLE

        for name in self.allow_changes:
            require(name in CHANGEABLE, "checkpoint.allow_changes", f"{name!r} is not a setting that may change "
                    "on resume.", f"use any of: {', '.join(CHANGEABLE)}.")
        require(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}.")
        require_positive(self.keep_last, "checkpoint.keep_last")
        if self.dir:
            check_path_names(self.dir, "checkpoint.dir")
        if self.resume not in ("auto", "none"):
            check_path_names(self.resume, "checkpoint.resume")
            require(not _CHECK_FILES.get() or Path(self.resume).is_dir(), "checkpoint.resume",
                    f"{self.resume} does not exist.",
                    "use auto, none, or an existing checkpoint folder.")


@dataclass(kw_only=True)
class LoggingConfig:
    """Metrics: rank-0 progress bar, JSONL file, wandb.

    Args:
        wandb: ``offline`` (default; sync later with `wandb sync`), ``online`` or ``disabled``.
        project: wandb project.
        run_name: wandb run name; default the recipe name.
        progress: show the rank-0 progress bar.
    """

    wandb: str = "offline"
    project: str = "longshard"
    run_name: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _choice(self.wandb, WANDB_MODES, "logging.wandb")


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation hook (held-out loss, passkey accuracy).

    Args:
        every: steps between evaluations (0 = only at the end).
        at_end: evaluate after the last step.
        val_batches: held-out micro-batches for the validation loss.
        passkey_samples: passkey prompts per length (depths spread over the context).
        passkey_lengths: lengths to test; default [seq_len, 2 x seq_len].
        passkey_depths: key depths of the ``longshard eval`` grid (lengths x depths heatmap).
        ppl_lengths: context lengths for ``ppl@L`` (held-out windows of L tokens, loss on their
            second half); needs prepared held-out data.
        ppl_windows: windows per length.
        mqar_samples: MQAR sequences (of train.seq_len tokens) for ``mqar_acc``; 0 = skip.
        mqar_num_kv_pairs: key/value pairs per MQAR sequence.
    """

    every: int = 0
    at_end: bool = True
    val_batches: int = 4
    passkey_samples: int = 8
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    ppl_lengths: list[int] = field(default_factory=list)
    ppl_windows: int = 4
    mqar_samples: int = 0
    mqar_num_kv_pairs: int = 16

    def __post_init__(self) -> None:
        require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}.")
        require(self.val_batches >= 0, "eval.val_batches", f"must be >= 0, got {self.val_batches}.")
        require(self.passkey_samples >= 0, "eval.passkey_samples", f"must be >= 0, got {self.passkey_samples}.")
        for n in self.passkey_lengths:
            require_positive(n, "eval.passkey_lengths")
        for d in self.passkey_depths:
            require(0.0 <= d <= 1.0, "eval.passkey_depths", f"{d} is outside [0, 1] (0 = start, 1 = end).")
        for n in self.ppl_lengths:
            require(n >= 2 and n % 2 == 0, "eval.ppl_lengths", f"{n}: use even lengths >= 2 (loss on the second half).")
        require_positive(self.ppl_windows, "eval.ppl_windows")
        require(self.mqar_samples >= 0, "eval.mqar_samples", f"must be >= 0, got {self.mqar_samples}.")
        require_positive(self.mqar_num_kv_pairs, "eval.mqar_num_kv_pairs")


@dataclass(kw_only=True)
class InitConfig:
    """Where initial weights come from.

    Args:
        hf_path: local Hugging Face checkpoint folder to continue training from; its config.json
            defines the architecture (``model.attention`` still applies).
        hf_model: ``convert`` (into longshard's own model: Llama, Qwen2, Qwen3) or ``transformers``
            (any causal LM transformers knows, built by transformers with longshard's attention backend;
            see docs/transformers.md).
        rope_scaling: ``keep`` the checkpoint's RoPE, or extend the context with ``linear``, ``ntk``,
            ``yarn`` or ``llama3`` scaling by ``rope_factor`` (original length = the checkpoint's).
        rope_factor: context extension factor.
        conversion_eval_batches: when ``model.attention`` converts the checkpoint (a sparse variant,
            gates), held-out micro-batches on which the loss of the original (dense, ungated) and the
            converted model are measured before training (report.json ``conversion``); 0 = skip.
    """

    hf_path: str | None = None
    hf_model: str = "convert"
    rope_scaling: str = "keep"
    rope_factor: float = 1.0
    conversion_eval_batches: int = 2

    def __post_init__(self) -> None:
        _choice(self.rope_scaling, INIT_ROPE, "init.rope_scaling")
        _choice(self.hf_model, HF_MODELS, "init.hf_model")
        require_positive(self.rope_factor, "init.rope_factor")
        require(self.conversion_eval_batches >= 0, "init.conversion_eval_batches",
                f"must be >= 0, got {self.conversion_eval_batches}.")
        if self.hf_path is not None:
            check_path_names(self.hf_path, "init.hf_path")
            require(Path(self.hf_path, "config.json").is_file(), "init.hf_path",
                    f"{self.hf_path} is not a Hugging Face checkpoint folder (no config.json).",
                    "point it at a local folder with config.json and *.safetensors.")
