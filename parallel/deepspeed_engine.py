"""DeepSpeed as the training engine: ZeRO 0-3 (and optimizer offload) around the same model.

The model keeps its sequence-parallel wrappers; DeepSpeed's data-parallel group is every rank
(like our DDP), so sequence-parallel ranks' gradients add up as with the native engine. Our
torch AdamW is handed to DeepSpeed (no compiled DeepSpeed ops needed), the learning-rate schedule
stays ours, parameters stay fp32 (bf16 runs use the same autocast as the native engine), and
gradient clipping is DeepSpeed's (``gradient_clipping``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Any

import torch
from longshard.errors import ConfigError
from longshard.files import read_json
from torch import nn


def import_deepspeed():
    """Import deepspeed (CPU accelerator when no GPU), or raise a ConfigError naming the fix."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError("train.engine", f"deepspeed is not installed ({e}).",
                          "pip install 'longshard[deepspeed]' or set train.engine=native.") from None
    return deepspeed


def is_deepspeed_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeedEngine (checked without importing deepspeed)."""
    return type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "save_checkpoint")


def deepspeed_config(
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    zero_stage: int,
    offload_optimizer: bool,
    config_file: str | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict: a user's JSON (if any) under the values derived from the recipe.

    Raises:
        ConfigError: the user's file sets a derived key to a different value.
    """
    user: dict[str, Any] = {}
    if config_file is not None:
        try:
            user = read_json(config_file)
        except (ValueError, OSError) as e:
            raise ConfigError("deepspeed.config_file", f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError("deepspeed.config_file", f"{config_file} holds a {type(user).__name__}, "
                              "not a JSON object.")
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # DeepSpeed counts every rank as data parallel (sequence-parallel ranks included)
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in ours.items():
        if key in user and user[key] != value:
            raise ConfigError("deepspeed.config_file", f"{key}={user[key]!r} contradicts the recipe ({value!r}).",
                              "remove it from the JSON (longshard derives it) or change the recipe.")
    zero = dict(user.get("zero_optimization", {}))
    if "stage" in zero and zero["stage"] != zero_stage:
        raise ConfigError("deepspeed.config_file", f"zero_optimization.stage={zero['stage']} contradicts "
                          f"deepspeed.zero_stage={zero_stage}.", "set the stage in one place.")
    zero["stage"] = zero_stage
    if offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": torch.cuda.is_available()})
    cfg = {
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "zero_force_ds_cpu_optimizer": False,
        **user,
        **ours,
        "zero_optimization": zero,
    }
    for precision in ("fp16", "bf16"):  # parameters stay fp32; the trainer's autocast handles bf16
        if cfg.get(precision, {}).get("enabled"):
            raise ConfigError("deepspeed.config_file", f"{precision}.enabled is not supported: parameters stay fp32.",
                              "use train.dtype=bf16 (autocast) instead.")
    return cfg


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> nn.Module:
    """``deepspeed.initialize`` on an already initialised process group; returns the engine."""
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


# What a DeepSpeed ZeRO 1-3 checkpoint pickles besides tensors and plain containers (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on stages 1, 2, 3 and optimizer offload):
# an enum, a dataclass and the loss-scaler record, all rebuilt from data without running code.
DS_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)


def _ds_safe_globals() -> list[Any]:
    import importlib

    found = []
    for name in DS_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: that record is not written
            continue
    return found


@contextlib.contextmanager
def weights_only_loading(path: str):
    """Make every ``torch.load`` inside the block a ``weights_only=True`` load that accepts only the
    records in ``DS_SAFE_GLOBALS`` (DeepSpeed's own reader would unpickle any object); a file needing
    anything else is refused with an error naming it.

    Args:
        path: the checkpoint folder, for the error message.
    """
    original = torch.load

    def restricted(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            first = str(e).split("\n")
            detail = next((line.strip() for line in first if "GLOBAL" in line or "global" in line), first[0])
            raise DeepSpeedLoadRefused(
                f"refusing to load {f} of the DeepSpeed checkpoint {path}: it needs more than tensors and plain "
                f"data ({detail[:300]}); loading it could run code stored in the file. Delete that checkpoint or, "
                "if you wrote it yourself with another DeepSpeed version, resume with train.engine=deepspeed "
                "from a checkpoint written by this version."
            ) from None

    with torch.serialization.safe_globals(_ds_safe_globals()):
        torch.load = restricted
        try:
            yield
        finally:
            torch.load = original


class DeepSpeedLoadRefused(RuntimeError):
    """A DeepSpeed checkpoint file holds pickled objects beyond the allowed records."""


def check_deepspeed_files_safe(folder: str | os.PathLike) -> None:
    """Refuse a DeepSpeed checkpoint folder whose ``.pt`` files pickle anything beyond tensors,
    plain data and ``DS_SAFE_GLOBALS`` (read without unpickling: the pickle opcodes are scanned).

    Raises:
        DeepSpeedLoadRefused: naming the file and the global it would import.
    """
    from pathlib import Path

    for file in sorted(Path(folder).rglob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception as e:  # not a torch zip file at all
            raise DeepSpeedLoadRefused(f"{file} is not a readable torch checkpoint file: {e}") from None
        extra = sorted(set(unsafe) - set(DS_SAFE_GLOBALS))
        if extra:
            raise DeepSpeedLoadRefused(
                f"refusing to load {file}: it would import {', '.join(extra)}, which can run code stored in the "
                "file (a DeepSpeed checkpoint holds only tensors, plain data and "
                f"{', '.join(n.rpartition('.')[2] for n in DS_SAFE_GLOBALS)}). Delete that checkpoint; never "
                "resume from files you did not write."
            )
