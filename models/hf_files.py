"""Checking the weight files of a Hugging Face checkpoint before anything reads them.

A safetensors header is validated as the format defines it (so the whole-model loader and the
shard-by-shard loader can trust it), in time linear in its size; a pickle weight file is read only
by ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import torch
from longshard.errors import ConfigError
from longshard.files import load_json

# bytes per element of each safetensors dtype (the format's own list)
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                      "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):  # linear: 40,000 names take milliseconds (a count per name took a minute)
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"tensor {dup!r} is listed twice")
    return out


def safetensors_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts, validated as the
    format defines it, so every loader (whole model or one rank's rows) can trust it: header size within
    the file and the library's limit, one JSON object without duplicate names, every tensor with a known
    dtype, a shape of non-negative integers and ``data_offsets`` [begin, end] with 0 <= begin <= end and
    end - begin = dtype size x elements, the spans laid end to end without overlap or gap from 0, and
    the file holding every byte they describe (ConfigError naming the file and the tensor)."""
    size = file.stat().st_size

    def damaged(why: str) -> ConfigError:
        return ConfigError("init.hf_path", f"{file} is not a valid safetensors file: {why}.",
                           "re-copy or re-download that file (a file edited by hand or by a tool you do not trust "
                           "is refused, not loaded).")

    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ConfigError("init.hf_path", f"{file} is not a readable safetensors file ({size} bytes; its header "
                              "is cut short or damaged).", "re-copy or re-download that file.")
        header = f.read(n)
    try:
        meta = load_json(header.decode("utf-8"), max_depth=8, max_bytes=MAX_SAFETENSORS_HEADER,
                         object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(f"its header is not JSON ({str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise damaged("its header is not a JSON object")
    spans = []
    for key, entry in meta.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise damaged("__metadata__ is not an object of strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise damaged(f"tensor {key!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise damaged(f"tensor {key!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise damaged(f"tensor {key!r} has shape {shape!r}, not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise damaged(f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
        need = SAFETENSORS_DTYPES[dtype] * math.prod(shape)
        if offsets[1] - offsets[0] != need:
            raise damaged(f"tensor {key!r} spans {offsets[1] - offsets[0]} bytes, its dtype and shape "
                          f"({dtype} x {shape}) need {need}")
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    end, gap = 0, None
    for begin, stop, key in spans:  # an overlap (two names reading the same bytes) is named before a gap
        if begin < end:
            raise damaged(f"tensor {key!r} at bytes [{begin}, {stop}) overlaps the tensor before it")
        if begin > end and gap is None:
            gap = f"tensor {key!r} at bytes [{begin}, {stop}) leaves a gap of {begin - end} bytes"
        end = stop
    if gap is not None:
        raise damaged(gap)
    if size < 8 + n + end:
        raise ConfigError("init.hf_path", f"{file} is truncated: {size} bytes, its header describes "
                          f"{8 + n + end} bytes of tensors.", "re-copy or re-download that file.")
    return meta, 8 + n


def check_weight_file(file: Path) -> dict | None:
    """Refuse a damaged or unsafe weight file before anything is loaded: a safetensors file whose
    header or data is cut short, or a pickle ``.bin`` that would import anything beyond tensors.
    Only the header (safetensors) or the pickle opcodes (``.bin``) are read. Returns a safetensors
    file's validated header (None for a pickle)."""
    if file.suffix == ".safetensors":
        return safetensors_header(file)[0]
    if not zipfile.is_zipfile(file):  # legacy (pre-zip) torch pickle: weights_only=True load decides
        return None
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception as e:
        raise ConfigError("init.hf_path", f"{file} is not a readable torch file ({e}).",
                          "re-copy the file, or use the checkpoint's safetensors weights.") from None
    if unsafe:
        raise _unsafe_pickle(file, ", ".join(sorted(unsafe)))
    return None


def _unsafe_pickle(file: Path, what: str) -> ConfigError:
    return ConfigError(
        "init.hf_path",
        f"{file} is a pickle that would import {what}, which can run code stored in the file; longshard "
        "loads pickles only with weights_only=True and never relaxes that.",
        "convert it to safetensors on a machine you trust (transformers: "
        "model.save_pretrained(out, safe_serialization=True)) and point init.hf_path at the result.",
    )
