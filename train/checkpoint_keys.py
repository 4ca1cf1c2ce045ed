"""Checkpoint keys that do not depend on the parallel layout.

Sequence parallelism wraps a layer's core attention (``core_attention`` becomes a wrapper whose
``inner`` is the variant), so the live names of a parameterized variant's weights carry one ``.inner``
per wrapper (``layers.0.attention.core_attention.inner.compress_k`` under Ulysses). A checkpoint keeps
the names of the unwrapped model (``...core_attention.compress_k``), so it loads into any layout:
another ``sp_mode`` or degree on resume, one process for ``longshard eval`` / ``export-hf``. Checkpoints
written before this rule (with ``.inner`` in their keys) still load: their own names are looked up in
their metadata.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

_WRAPPED = re.compile(r"(\.core_attention)(?:\.inner)+(?=\.)")


def canonical_fqn(fqn: str) -> str:
    """The layout-free name of a live parameter or buffer name."""
    return _WRAPPED.sub(r"\1", fqn)


def rename_fqns(state: dict, fn: Callable[[str], str]) -> dict:
    """``{"model": ..., "optim": ...}`` (either may be absent) with every parameter name mapped by ``fn``:
    the model's keys, the optimizer's per-parameter state keys and its param groups' ``params``."""
    out = dict(state)
    if "model" in state:
        out["model"] = {fn(k): v for k, v in state["model"].items()}
    if "optim" in state:
        optim = dict(state["optim"])
        if "state" in optim:
            optim["state"] = {fn(k): v for k, v in optim["state"].items()}
        if "param_groups" in optim:
            optim["param_groups"] = [{**g, "params": [fn(p) for p in g["params"]]} for g in optim["param_groups"]]
        out["optim"] = optim
    return out


def file_names(checkpoint_keys: Iterable[str]) -> Callable[[str], str]:
    """Live name -> the name a checkpoint holds it under: the layout-free name, or the wrapped name an
    older checkpoint used (found among ``checkpoint_keys``, its ``model.``-prefixed metadata keys)."""
    legacy = {canonical_fqn(k[len("model."):]): k[len("model."):] for k in checkpoint_keys
              if k.startswith("model.") and ".core_attention.inner." in k}
    return lambda fqn: legacy.get(canonical_fqn(fqn), canonical_fqn(fqn))


def read_renamed(state: dict, path: Path, read: Callable[[dict, Path], None], keys: Iterable[str]) -> dict:
    """Read ``state`` (live names) from ``path`` under the checkpoint's names and return it with the live
    names again.

    Args:
        state: ``{"model": ..., "optim": ...}`` as the live model and optimizer name them.
        path: the checkpoint folder.
        read: the reader (``read_dcp``).
        keys: the checkpoint's metadata keys.
    """
    to_file = file_names(keys)
    live = {}
    for name in state.get("model", {}):
        live[to_file(name)] = name
    for name in state.get("optim", {}).get("state", {}):
        live[to_file(name)] = name
    renamed = rename_fqns(state, to_file)
    read(renamed, path)
    return rename_fqns(renamed, lambda k: live.get(k, k))
