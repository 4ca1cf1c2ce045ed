"""Loading a Hugging Face checkpoint into an already-sharded model: no rank holds the whole model.

The model is built with its parameters on the meta device (:func:`parameters_on_meta`: buffers such
as RoPE frequencies stay real), sharded by FSDP2 as usual, then :func:`load_hf_sharded` gives each
parameter its storage on the compute device and fills only this rank's shard, read as a slice of the
safetensors file (``safe_open(...).get_slice``: the bytes of other ranks' shards are never read into
memory). Peak host memory per rank is its shard plus one tensor slice at a time, instead of the full
fp32 model plus the full state dict.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from longshard.errors import ConfigError
from longshard.models.hf import from_hf_name, is_variant_parameter, safetensors_header, to_hf_name, weight_files
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

log = logging.getLogger(__name__)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside the block register their parameters on the meta device (shared parameters,
    e.g. tied embeddings, stay shared); buffers keep their real values."""
    original = nn.Module.register_parameter
    # id(real parameter) -> (that parameter, kept alive so its id is not reused; its meta twin)
    moved: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            if id(param) not in moved:
                moved[id(param)] = (param, nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad))
            param = moved[id(param)][1]
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def hf_names_of(model: nn.Module) -> dict[str, str] | None:
    """Our parameter name -> HF name for every parameter, or None when some parameter has no HF
    counterpart (a conversion that adds parameters: gates, NSA / NOSA weights)."""
    names = {}
    for name, _ in model.named_parameters():
        if is_variant_parameter(name):  # added by the conversion: a plain HF checkpoint has no such tensor
            return None
        try:
            hf = to_hf_name(name)
        except KeyError:
            return None
        if from_hf_name(hf) != name:
            return None
        names[name] = hf
    return names


def _local_part(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's storage of ``param`` and the slice of the full tensor it holds."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return param, tuple(slice(0, s) for s in param.shape)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_rows(file: Path, key: str, entry: dict, start: int, index: tuple[slice, ...], out: torch.Tensor) -> int:
    """Read the slice ``index`` of a safetensors tensor into ``out`` and return the bytes read.

    A slice of whole rows (FSDP2's dim-0 shards) is one contiguous byte range, read with plain file
    reads straight into ``out`` (or a buffer of the file's dtype), so no page of other ranks' shards is
    mapped into this process; any other slice goes through safetensors' ``get_slice``.
    """
    dtype = _DTYPES.get(entry["dtype"])
    shape = entry["shape"]
    whole_rows = all(s.start == 0 and s.stop == d for s, d in zip(index[1:], shape[1:]))
    if dtype is None or not whole_rows or not out.is_contiguous():
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            part = handle.get_slice(key)[index]
        out.copy_(part.to(out.dtype))
        return part.numel() * part.element_size()
    row = dtype.itemsize * math.prod(shape[1:])
    first = start + entry["data_offsets"][0] + (index[0].start * row if shape else 0)
    target = out if (out.dtype == dtype and out.device.type == "cpu") else torch.empty(out.shape, dtype=dtype)
    view = target.view(torch.uint8).reshape(-1).numpy()
    with open(file, "rb") as fh:
        fh.seek(first)
        got = fh.readinto(view)
    if got != view.size:
        raise ConfigError("init.hf_path", f"{file} is truncated: a tensor's bytes end early.", "re-copy that file.")
    if target is not out:
        out.copy_(target)
    return view.size


@torch.no_grad()
def load_hf_sharded(model: nn.Module, path: str | Path, device: torch.device) -> int:
    """Give ``model``'s meta parameters storage on ``device`` and fill this rank's shards from the HF
    checkpoint at ``path`` (buffers keep their values). Returns the bytes of tensors read.

    Raises:
        ConfigError: a parameter missing from the checkpoint or of another shape, naming it.
    """

    hf_name = hf_names_of(model)
    if hf_name is None:
        raise ConfigError("init.hf_path", "this model has parameters the checkpoint does not hold; it cannot be "
                          "loaded shard by shard.", "load it unsharded (the trainer does so by itself).")
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    files = weight_files(Path(path))
    if any(f.suffix != ".safetensors" for f in files):
        raise ConfigError("init.hf_path", f"{path} holds pickle weights: sharded loading reads safetensors slices.",
                          "convert the checkpoint to safetensors (transformers: save_pretrained(..., "
                          "safe_serialization=True)).")
    entries: dict[str, tuple[Path, dict, int]] = {}  # HF name -> (file, header entry, data start)
    for f in files:
        header, start = safetensors_header(f)
        for key, entry in header.items():
            if key != "__metadata__":
                entries[key] = (f, entry, start)
    read = 0
    for name, param in model.named_parameters():
        key = hf_name[name]
        if key not in entries:
            raise ConfigError("init.hf_path", f"{path}: tensor {key} (for {name}) is missing.")
        f, entry, start = entries[key]
        if tuple(entry["shape"]) != tuple(param.shape):
            raise ConfigError("init.hf_path", f"{path}: {key} has shape {tuple(entry['shape'])}, the model "
                              f"expects {tuple(param.shape)}.")
        local, index = _local_part(param)
        if local.numel():
            read += _read_rows(f, key, entry, start, index, local)
    log.info("loaded this rank's shards of %s (%.1f MB read)", path, read / 1e6)
    return read
