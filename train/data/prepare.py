"""``longshard data prepare``: text/jsonl files -> packed token memmaps plus a metadata file.

Layout of a prepared folder::

    meta.json    {"version", "tokenizer", "vocab_size", "bos_id", "eos_id", "dtype",
                  "splits": {"train": {"file", "n_tokens", "n_docs"}, "val": {...}}, "sources"}
    train.bin    token ids (uint16 or uint32), documents as BOS + text + EOS back to back
    val.bin      the held-out documents, same format
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from longshard.errors import ConfigError
from longshard.files import fresh_dir, load_json, read_json
from longshard.train.data.corpus import default_documents
from longshard.train.data.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)
META = "meta.json"
FORMAT_VERSION = 1


def iter_documents(inputs: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Documents from files: ``.jsonl`` gives one per line (``text_field``), anything else one per file.

    Folders are walked recursively in sorted order.
    """
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            raise ConfigError("data prepare --input", f"{p} does not exist.")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.suffix == ".jsonl":
                with f.open("rb") as fh:
                    for n, raw in enumerate(fh, 1):
                        try:
                            line = raw.decode("utf-8")
                        except UnicodeDecodeError as e:
                            raise ConfigError("data prepare --input", f"{f}:{n} is not valid UTF-8 (byte "
                                              f"{e.start + 1} of the line).", "re-encode the file as UTF-8.") from None
                        if not line.strip():
                            continue
                        try:
                            rec = load_json(line)
                        except ValueError as e:
                            why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                            raise ConfigError("data prepare --input", f"{f}:{n} is not valid JSON ({why}).",
                                              "fix or remove that line.") from None
                        if not isinstance(rec, dict) or text_field not in rec:
                            raise ConfigError("data prepare --text-field", f"{f}:{n} has no field {text_field!r}.")
                        if not isinstance(rec[text_field], str):
                            raise ConfigError("data prepare --input", f"{f}:{n}: {text_field!r} is "
                                              f"{json.dumps(rec[text_field])[:40]}, not a string.",
                                              "fix or remove that line.")
                        yield rec[text_field]
            else:
                yield f.read_text(encoding="utf-8", errors="replace")


def check_output(output: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an ``--output`` that would destroy or swallow data, before any work.

    Raises:
        ConfigError: the output equals an input, contains one, lies inside an input folder (its own
            files would be read back as documents), or is a non-empty folder that is not a previous
            ``data prepare`` output (no ``meta.json``).
    """
    out = Path(output).resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if out == src or out in src.parents:
            raise ConfigError("data prepare --output", f"{out} is or contains the input {src}: preparing would "
                              "replace it.", "choose an output folder outside the inputs.")
        if src.is_dir() and src in out.parents:
            raise ConfigError("data prepare --output", f"{out} lies inside the input folder {src}.",
                              "choose an output folder outside the inputs.")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META).is_file())):
        raise ConfigError("data prepare --output", f"{out} exists and is not a prepared data folder (no {META}).",
                          "choose a new or empty folder; a previous `data prepare` output is replaced.")
    return out


def prepare(
    output: str | Path,
    documents: Iterable[str],
    tokenizer: Tokenizer,
    val_fraction: float = 0.01,
    sources: list[str] | None = None,
    inputs: Iterable[str | Path] = (),
) -> dict:
    """Tokenize ``documents`` into ``output``/{train,val}.bin and meta.json; atomic (tmp + rename).

    Args:
        output: folder to create.
        documents: iterable of raw texts.
        tokenizer: tokenizer to apply.
        val_fraction: share of tokens held out for validation (whole documents, deterministic).
        sources: description of where the documents came from, stored in the metadata.
        inputs: the input paths, checked against ``output`` (see :func:`check_output`).

    Returns:
        The metadata dict. A previous prepare output at ``output`` is replaced only once the new one
        is complete; on any failure the temporary folder is removed and ``output`` is untouched.
    """
    out = check_output(output, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_dir(out.parent, f".{out.name}.tmp")  # a random name, created here: never a planted link
    except OSError as e:
        raise ConfigError("--output", f"cannot create {out.parent}/.{out.name}.tmp*: {e.strerror or e} "
                          f"(errno {e.errno}).",
                          "choose a writable --output folder.") from None
    try:
        meta = _write(tmp, documents, tokenizer, val_fraction, sources)
    except OSError as e:
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError("--output", f"no space left on device writing {tmp}: {written / 1e6:.1f} MB written "
                              f"when the disk filled, {shutil.disk_usage(tmp.parent).free / 1e6:.1f} MB free now "
                              "(the temporary folder was removed; nothing else changed).",
                              "free space or choose an --output on a larger disk (the token files take 2 bytes "
                              "per token for vocabularies up to 65,535, else 4).") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(out.name + f".old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("prepared %s: %d train / %d val tokens", out, meta["splits"]["train"]["n_tokens"],
             meta["splits"]["val"]["n_tokens"])
    return meta


BATCH_BYTES = 16 * 2**20  # text handed to the tokenizer at once (its threads share it); bounds the memory


def _batches(documents: Iterable[str], max_docs: int = 4096) -> Iterator[list[str]]:
    """Consecutive documents in lists of at most ``max_docs`` and about :data:`BATCH_BYTES` of text."""
    max_bytes = BATCH_BYTES
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= max_bytes or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write(tmp: Path, documents: Iterable[str], tokenizer: Tokenizer, val_fraction: float,
           sources: list[str] | None) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    counts = {"train": [0, 0], "val": [0, 0]}
    i = 0
    with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
        for batch in _batches(documents):
            for encoded in tokenizer.encode_batch(batch):  # in document order: the split is as one by one
                ids = np.asarray([tokenizer.bos_id, *encoded, tokenizer.eos_id], dtype=dtype)
                # Hold out whole documents, keeping val at ~val_fraction of all tokens (deterministic).
                seen = counts["train"][0] + counts["val"][0]
                split = "val" if i > 0 and counts["val"][0] < val_fraction * seen else "train"
                (fval if split == "val" else ftrain).write(ids.tobytes())
                counts[split][0] += ids.size
                counts[split][1] += 1
                i += 1
    if counts["train"][0] == 0:
        raise ConfigError("data prepare --input", "no documents were found: the prepared data would be empty.")
    meta = {
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": np.dtype(dtype).name,
        "splits": {s: {"file": f"{s}.bin", "n_tokens": c[0], "n_docs": c[1]} for s, c in counts.items()},
        "sources": sources or [],
    }
    (tmp / META).write_text(json.dumps(meta, indent=2))
    return meta


def prepare_default(output: str | Path, max_bytes: int, val_fraction: float = 0.05) -> dict:
    """Prepare the embedded default corpus (stdlib sources, byte-level tokens) into ``output``."""
    return prepare(output, default_documents(max_bytes), build_tokenizer(None), val_fraction,
                   sources=[f"python-stdlib (first {max_bytes} bytes)"])


TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")  # what a token file may hold (data prepare writes uint16/32)


def read_meta(path: str | Path) -> dict:
    """Metadata of a prepared folder, checked field by field (ConfigError naming the file and field):
    an integer token dtype, integer token counts that match the files' sizes, a vocabulary size,
    BOS/EOS ids inside it, and both the ``train`` and ``val`` splits."""
    p = Path(path)
    meta_file = p / META
    if not meta_file.is_file():
        raise ConfigError("data.path", f"{meta_file} does not exist.",
                          "run `longshard data prepare --input FILES --output DIR` first.")

    def bad(why: str) -> ConfigError:
        return ConfigError("data.path", f"{meta_file} is not a valid `data prepare` metadata file: {why}.",
                           "re-run `longshard data prepare` into a new folder.")

    try:
        meta = read_json(meta_file)
    except (ValueError, OSError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise bad("it is not a JSON object")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise bad(f"dtype is {meta.get('dtype')!r}, not an integer token type ({', '.join(TOKEN_DTYPES)})")
    vocab = meta.get("vocab_size")
    if type(vocab) is not int or vocab <= 0:
        raise bad(f"vocab_size is {vocab!r}, not a positive integer")
    for key in ("bos_id", "eos_id"):
        if type(meta.get(key)) is not int or not 0 <= meta[key] < vocab:
            raise bad(f"{key} is {meta.get(key)!r}, not a token id below vocab_size={vocab}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not {"train", "val"} <= set(splits):
        raise bad(f"splits has {sorted(splits) if isinstance(splits, dict) else splits!r}, not train and val")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        info = splits[split]
        if not isinstance(info, dict) or not isinstance(info.get("file"), str) or "/" in info["file"]:
            raise bad(f"splits.{split} is {info!r}, not {{file, n_tokens}}")
        n_tokens = info.get("n_tokens")
        if type(n_tokens) is not int or n_tokens < 0:
            raise bad(f"splits.{split}.n_tokens is {n_tokens!r}, not a non-negative integer")
        f = p / info["file"]
        if not f.is_file():
            raise ConfigError("data.path", f"{f} listed in {META} is missing.")
        expect = n_tokens * itemsize
        if f.stat().st_size != expect:
            raise ConfigError("data.path", f"{f} has {f.stat().st_size} bytes, {META} says {expect} ({split}).",
                              "re-run data prepare; the file is truncated or from another run.")
    if splits["train"]["n_tokens"] == 0:
        raise ConfigError("data.path", f"{p} holds no training tokens.")
    return meta
