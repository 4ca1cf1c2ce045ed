"""Typed run configuration. Recipes (YAML) and command-line overrides only fill these dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from longshard.errors import ConfigError, require
from longshard.files import check_path_names
from longshard.models.attention.registry import parse_options
from longshard.models.config import ModelConfig
from longshard.parallel.env import check_tp_heads
from longshard.train.config_sections import (  # noqa: F401 - re-exported: the sections' home was this module
    _CHECK_FILES,
    DATA_SOURCES,
    DEVICES,
    DTYPES,
    SP_MODES,
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    InitConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from longshard.train.data.synthetic import mqar_pairs_for
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Config:
    """A whole run. Build with :func:`load_config`.

    Args:
        name: run name (wandb group, default output folder).
        output_dir: where checkpoints, metrics and reports go; default ``runs/<name>``.
    """

    name: str = "run"
    output_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "must not be empty.")
        check_path_names(self.output_dir or Path("runs") / self.name, "output_dir" if self.output_dir else "name")
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)
        if self.checkpoint.dir is None:
            self.checkpoint.dir = str(Path(self.output_dir) / "checkpoints")
        if self.init.hf_path is None:
            limit = self.model.max_seq_len
            require(
                self.train.seq_len <= limit,
                "train.seq_len",
                f"{self.train.seq_len} exceeds model.max_seq_len={limit}.",
                "train shorter, raise model.max_seq_len, or extend RoPE (model.rope.scaling) for longer context.",
            )
        if self.parallel.sp_mode == "auto":
            self.parallel.sp_mode = self._auto_sp_mode()
        if self.train.engine == "deepspeed" and self.parallel.dp_mode != "ddp":  # the engine implies its own
            log.info("parallel.dp_mode=%s does not apply under train.engine=deepspeed: ZeRO-%d shards instead",
                     self.parallel.dp_mode, self.deepspeed.zero_stage)
            self.parallel.dp_mode = "ddp"
        if self.optim.warmup_steps > self.train.steps:
            log.warning("optim.warmup_steps=%d exceeds train.steps=%d: the learning rate only reaches %.0f%% of "
                        "optim.lr", self.optim.warmup_steps, self.train.steps,
                        100 * self.train.steps / self.optim.warmup_steps)
        if self.train.engine == "deepspeed":
            require(self.train.dtype != "fp16", "train.dtype",
                    "fp16 runs with the native engine (dynamic loss scaling by torch's GradScaler); the DeepSpeed "
                    "engine keeps fp32 parameters and runs bf16 or fp32 compute.",
                    "use train.dtype=bf16 with DeepSpeed, or train.engine=native for fp16.")
            require(self.train.nan_policy == "stop", "train.nan_policy",
                    "skip is not available with train.engine=deepspeed (its step runs before the loss is known).",
                    "use train.nan_policy=stop.")
        if self.init.hf_model == "transformers":
            self._check_transformers_model()
        if self.parallel.tp_degree > 1:
            self._check_tensor_parallel()
        sp = self.parallel.sp_degree
        need = 2 * sp if (self.parallel.sp_mode in ("ring", "hybrid") and sp > 1) else sp  # zigzag: 2 chunks/rank
        if self.parallel.sp_mode in ("ulysses", "hybrid") and sp > 1:
            self._check_head_parallel()
        if self.parallel.sp_mode in ("ring", "hybrid") and sp > 1:
            need = self._ring_granularity(need)
        require(self.train.seq_len % need == 0, "train.seq_len",
                f"{self.train.seq_len} is not divisible by {need} (parallel.sp_degree={sp}, "
                f"sp_mode={self.parallel.sp_mode}).", f"choose seq_len as a multiple of {need}.")
        for n in self.eval.passkey_lengths:
            require(n % need == 0, "eval.passkey_lengths", f"{n} is not divisible by {need} (sequence parallel).")
            if self.init.hf_path is None and self.eval.passkey_samples and n > self.model.max_seq_len:
                log.warning("eval.passkey_lengths: %d exceeds model.max_seq_len=%d; that figure measures "
                            "extrapolation past the model's context (expect it near 0)", n, self.model.max_seq_len)
        for n in self.eval.ppl_lengths:
            require(n % need == 0, "eval.ppl_lengths", f"{n} is not divisible by {need} (sequence parallel).")
            if self.init.hf_path is None:  # an HF checkpoint's context is checked once its config is read
                require(n <= self.model.max_seq_len, "eval.ppl_lengths",
                        f"{n} exceeds model.max_seq_len={self.model.max_seq_len}.", "lower it or extend RoPE.")
        if self.eval.mqar_samples:
            require(4 * self.eval.mqar_num_kv_pairs <= self.train.seq_len, "eval.mqar_num_kv_pairs",
                    f"{self.eval.mqar_num_kv_pairs} pairs need seq_len >= {4 * self.eval.mqar_num_kv_pairs}.")
            require(self.eval.mqar_num_kv_pairs < self.model.vocab_size // 2 - 1, "eval.mqar_num_kv_pairs",
                    f"too many pairs for vocab_size={self.model.vocab_size}.")
        if self.data.source == "mqar":
            require(4 * self.data.mqar_num_kv_pairs <= self.train.seq_len, "data.mqar_num_kv_pairs",
                    f"{self.data.mqar_num_kv_pairs} pairs need seq_len >= {4 * self.data.mqar_num_kv_pairs}.")
            require(self.data.mqar_num_kv_pairs < self.model.vocab_size // 2 - 1, "data.mqar_num_kv_pairs",
                    f"too many pairs for vocab_size={self.model.vocab_size}.")
        if self.data.mqar_curriculum:
            self._check_mqar_curriculum()

    def _check_mqar_curriculum(self) -> None:
        """Document lengths that divide the sequence, hold their pairs, ascend to seq_len, fit the data."""
        d, S, field_ = self.data, self.train.seq_len, "data.mqar_curriculum"
        require(d.source == "mqar", field_, f"applies to data.source=mqar, not {d.source!r}.",
                "remove it or use data.source=mqar.")
        require(d.doc_mask, field_, "packs independent documents, so it needs data.doc_mask=true.",
                "set data.doc_mask=true (or drop the curriculum).")
        lengths = list(d.mqar_curriculum)
        require(lengths == sorted(lengths) and lengths[-1] == S, field_,
                f"{lengths} must ascend and end with train.seq_len={S}.", f"e.g. [{S // 4}, {S // 2}, {S}].")
        for n in lengths:
            k = mqar_pairs_for(d.mqar_num_kv_pairs, n, S)
            require(n > 0 and S % n == 0 and 4 * k <= n, field_,
                    f"{n}: each length must divide train.seq_len={S} and hold its {k} pair(s) (>= {4 * k} tokens).",
                    "use divisors of seq_len such as powers of two.")
        need_samples = self.train.steps * self.train.global_batch_size
        require(d.synthetic_samples >= need_samples, "data.synthetic_samples",
                f"{d.synthetic_samples} samples are fewer than the run reads ({need_samples} = steps x "
                "global_batch_size); a second epoch would restart the curriculum.",
                f"set data.synthetic_samples >= {need_samples}.")

    def _check_transformers_model(self) -> None:
        """``init.hf_model=transformers``: a checkpoint folder, transformers installed, and what runs on a
        transformers model (native engine with DDP/FSDP2 and sequence parallelism; full or no checkpointing)."""
        field_ = "init.hf_model"
        require(self.init.hf_path is not None, field_, "transformers builds the model from init.hf_path's "
                "config.json, and init.hf_path is not set.", "set init.hf_path to a local checkpoint folder.")
        require(importlib.util.find_spec("transformers") is not None, field_, "transformers is not installed.",
                "pip install 'longshard[transformers]'.")
        t, p = self.train, self.parallel
        for ok, name, value, fix in (
            (t.engine == "native", "train.engine", t.engine, "use train.engine=native (DDP or FSDP2)"),
            (p.tp_degree == 1, "parallel.tp_degree", p.tp_degree, "use tp_degree=1 (sequence parallel splits "
             "long sequences)"),
            (t.activation_checkpointing in ("none", "full"), "train.activation_checkpointing",
             t.activation_checkpointing, "use full (transformers' own checkpointing) or none"),
            (t.activation_offload == "none", "train.activation_offload", t.activation_offload, "use none"),
        ):
            require(ok, name, f"{value} is not available with init.hf_model=transformers.",
                    f"{fix}, or init.hf_model=convert for a Llama/Qwen checkpoint.")

    def _check_tensor_parallel(self) -> None:
        """Tensor parallel: native engine with FSDP2, heads and FFN divisible, no core-attention parameters."""
        tp = self.parallel.tp_degree
        require(self.train.engine == "native", "parallel.tp_degree",
                f"tp_degree={tp} runs with the native engine, not train.engine={self.train.engine}.",
                "use train.engine=native, or tp_degree=1 with DeepSpeed.")
        require(self.parallel.dp_mode == "fsdp2", "parallel.dp_mode",
                "tensor parallel (tp_degree > 1) composes with FSDP2, not DDP.", "set parallel.dp_mode=fsdp2.")
        for i, spec in enumerate(self.model.attention):
            problem = parse_options(spec.name, spec.options, f"model.attention[{i}]").tensor_parallel_problem()
            require(problem is None, "parallel.tp_degree",
                    f"model.attention[{i}] ({spec.name}): {problem}, which tensor parallelism does not split.",
                    "use tp_degree=1 (sequence parallel runs this variant).")
        if self.init.hf_path is None:  # an HF checkpoint's head counts are checked when the model is built
            m = self.model
            check_tp_heads(m.n_query_heads or m.n_heads, m.n_kv_heads or m.n_heads, tp)

    def _auto_sp_mode(self) -> str:
        """``parallel.sp_mode=auto``: ring when every layer has a ring form (dense ring with overlap, the
        sparsity-aware exchange, linear state passing), else Ulysses."""
        for i, spec in enumerate(self.model.attention):
            if parse_options(spec.name, spec.options, f"model.attention[{i}]").context_parallel() is None:
                if self.parallel.sp_degree > 1:
                    log.info("parallel.sp_mode=auto -> ulysses: model.attention[%d] (%s) has no ring form", i,
                             spec.name)
                return "ulysses"
        return "ring"

    def _check_head_parallel(self) -> None:
        """Ulysses (and hybrid's Ulysses part) runs each rank on a slice of every layer's heads."""
        for i, spec in enumerate(self.model.attention):
            problem = parse_options(spec.name, spec.options, f"model.attention[{i}]").head_parallel_problem()
            require(problem is None, "parallel.sp_mode",
                    f"sp_mode={self.parallel.sp_mode} splits heads over ranks; model.attention[{i}] ({spec.name}): "
                    f"{problem}.", "use parallel.sp_degree=1 for this variant (data parallel over the ranks).")

    def _ring_granularity(self, need: int) -> int:
        """Check every layer can run under ring/hybrid; block-sparse layers (sparsity-aware exchange)
        need whole blocks in each of the 2 x sp zigzag chunks. Returns the sequence-length multiple."""
        mode, sp = self.parallel.sp_mode, self.parallel.sp_degree
        ring = sp // self.parallel.sp_ulysses_degree if mode == "hybrid" else sp  # ranks along the ring
        for i, spec in enumerate(self.model.attention):
            opts = parse_options(spec.name, spec.options, f"model.attention[{i}]")
            require(opts.context_parallel() is not None, "parallel.sp_mode",
                    f"sp_mode={mode} needs a ring form for every layer; model.attention[{i}] ({spec.name!r}"
                    f"{f' with {dict(spec.options)}' if spec.options else ''}) has none: its block selection or "
                    "gates need all of a head's keys.",
                    "use sp_mode=ulysses for this variant." if opts.head_parallel_problem() is None
                    else "use parallel.sp_degree=1 for this variant (its heads cannot be split either).")
            need = math.lcm(need, opts.ring_seq_multiple(ring))
        return need

    @property
    def data_dir(self) -> Path | None:
        """Folder of the prepared token data (the embedded corpus is prepared under output_dir)."""
        if self.data.source == "prepared":
            return Path(self.data.path)
        if self.data.source == "default":
            return Path(self.output_dir) / "data" / "default"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for logging and saving)."""
        return dataclasses.asdict(self)


def recipe_path(recipe: str | Path) -> Path:
    """Resolve a recipe: an existing file, or the name of one shipped in ``longshard/recipes``."""
    p = Path(recipe)
    if p.is_file():
        return p
    shipped = resources.files("longshard") / "recipes"
    name = p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml"
    candidate = Path(str(shipped / name))
    if candidate.is_file():
        return candidate
    known = sorted(f.name.removesuffix(".yaml") for f in shipped.iterdir() if f.name.endswith(".yaml"))
    raise ConfigError("recipe", f"{recipe} is neither a file nor a shipped recipe.", f"shipped: {', '.join(known)}.")


def _shape_error(value: Any, tp: Any, path: str) -> ConfigError | None:
    """The first place where ``value`` (plain YAML data) does not have the shape of the annotation ``tp``:
    a mapping where a list or a value is expected (or the reverse), or an unknown dataclass field,
    named by its full path (``model.attention[0].option``). Scalar types are left to OmegaConf."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or len(options) != 1:
            return None
        tp, origin = options[0], typing.get_origin(options[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return ConfigError(path, f"expects a mapping of {tp.__name__} fields, got {_kind(value)} {value!r}.",
                               f"write it as {{field: value, ...}}; fields: {', '.join(_fields(tp))}.")
        hints = typing.get_type_hints(tp)
        for key, v in value.items():
            if key not in hints or key not in _fields(tp):
                close = difflib.get_close_matches(str(key), _fields(tp), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                return ConfigError(f"{path}.{key}", f"unknown key in {tp.__name__}.{hint}",
                                   f"remove it or fix its spelling; {tp.__name__} has: {', '.join(_fields(tp))}.")
            found = _shape_error(v, hints[key], f"{path}.{key}")
            if found:
                return found
        return None
    if origin in (list, tuple):
        if isinstance(value, dict) or (value is not None and not isinstance(value, (list, tuple))):
            return ConfigError(path, f"expects a list, got {_kind(value)} {value!r}.",
                               "write it as [item, ...] (a single item still needs the brackets).")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        for i, v in enumerate(value or []):
            found = _shape_error(v, item, f"{path}[{i}]")
            if found:
                return found
        return None
    if origin is dict or tp is dict:
        if value is not None and not isinstance(value, dict):
            return ConfigError(path, f"expects a mapping, got {_kind(value)} {value!r}.", "write it as {key: value}.")
        return None
    if tp in (int, float, str, bool) and isinstance(value, (dict, list)):
        return ConfigError(path, f"expects a single {tp.__name__}, got {_kind(value)} {value!r}.",
                           f"give one {tp.__name__} value.")
    return None


def _kind(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, (list, tuple)) else "the value"


def _fields(tp: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(tp) if f.init]


def _wrap(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or "config"
    msg = str(e).split("\n")[0]
    if "not in" in msg:
        return ConfigError(key, f"unknown key ({msg}).", "remove it or fix its spelling; see the dataclass docs.")
    return ConfigError(key, f"{msg}.", "give a value of the declared type.")


@functools.cache
def _schema():
    """The typed schema every config is merged onto (built once: OmegaConf.merge copies it)."""
    schema = OmegaConf.structured(Config)
    for name in ModelConfig.DERIVED:  # the default ModelConfig() resolved them for *its* sizes
        schema.model[name] = None
    return schema


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = True) -> Config:
    """Build a validated :class:`Config` from a recipe YAML and ``key=value`` overrides.

    Args:
        recipe: path or shipped recipe name; None = all defaults.
        overrides: dotted overrides such as ``train.steps=100``.
        check_files: check that the files the config names exist (``data.path``, ``data.tokenizer``,
            ``checkpoint.resume``, ``deepspeed.config_file``): off for planning and for a saved
            checkpoint's config, which must load on a machine without the training run's files.
    """
    token = _CHECK_FILES.set(check_files)
    try:
        return _load_config(recipe, overrides)
    finally:
        _CHECK_FILES.reset(token)


def _load_config(recipe: str | Path | None, overrides: list[str] | None) -> Config:
    layers = [_schema()]
    try:
        if recipe is not None:
            path = recipe_path(recipe)
            try:
                layers.append(OmegaConf.load(path))
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise ConfigError(str(path), f"is not valid YAML{where}: {getattr(e, 'problem', None) or e}.",
                                  "fix the recipe's syntax (indentation, a missing ':' or closing bracket).") from None
        for o in overrides or []:
            if "=" not in o:
                raise ConfigError(o, "override must look like key=value.", "e.g. train.steps=100.")
        if overrides:
            try:
                layers.append(OmegaConf.from_dotlist(list(overrides)))
            except (yaml.YAMLError, OmegaConfBaseException):
                for o in overrides:  # name the one that does not parse
                    try:
                        OmegaConf.from_dotlist([o])
                    except (yaml.YAMLError, OmegaConfBaseException) as e:
                        raise ConfigError(o.split("=", 1)[0], f"the override {o!r} does not parse "
                                          f"({str(e).splitlines()[0]}).", "quote it for the shell and write lists "
                                          "as [a, b], mappings as {k: v}.") from None
                raise
        for layer in layers[1:]:  # shapes and unknown keys, named by their full path, before OmegaConf merges
            found = _shape_error(OmegaConf.to_container(layer), Config, "")
            if found:
                found.field = found.field.lstrip(".")
                raise ConfigError(found.field, found.problem, found.fix)
        merged = OmegaConf.merge(*layers)
        # `???` in a recipe marks a required value; merging onto the schema would keep the default.
        missing = sorted(OmegaConf.missing_keys(OmegaConf.merge(*layers[1:]))) if len(layers) > 1 else []
        if missing:
            raise ConfigError(missing[0], "is required (the recipe leaves it as ???).",
                              f"set it on the command line, e.g. {missing[0]}=VALUE.")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _wrap(e) from None


def dump_config(cfg: Config) -> str:
    """YAML text of a config (round-trips through :func:`load_config`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
