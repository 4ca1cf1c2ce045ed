"""What a checkpoint was trained with, so a resume never silently continues something else.

Each checkpoint's state file records a fingerprint: the resolved model config, the tokenizer,
the data (source, path, a hash of ``meta.json``, the token file's size and a sampled digest, and
every ``data.*`` setting that changes what a step sees: document masking, shuffling, the synthetic
tasks' size, MQAR's pairs and curriculum), the sequence length, global batch, seed and the
optimizer settings. On resume the current run's
fingerprint is compared with it before anything is loaded: a different model is refused, naming
each field (``model.n_layers: checkpoint 4, now 2``); other differences are refused unless listed in
``checkpoint.allow_changes``, and then they take effect. ``train.steps`` (extending a run),
``checkpoint.*``, logging, evaluation and the parallel layout (DCP reshards) may always change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from pathlib import Path
from typing import Any

from longshard.errors import ConfigError

OPTIM_FIELDS = ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "schedule", "warmup_steps",
                "decay_fraction")
CHANGEABLE = (*(f"optim.{f}" for f in OPTIM_FIELDS), "train.seq_len", "train.global_batch_size", "train.seed",
              "data")


def _data_digest(path: Path) -> dict[str, Any]:
    """meta.json hash, token file size and a CRC of 8 evenly spaced 64 KB samples of train.bin."""
    out: dict[str, Any] = {}
    meta = path / "meta.json"
    if meta.is_file():
        out["meta_sha256"] = hashlib.sha256(meta.read_bytes()).hexdigest()
    tokens = path / "train.bin"
    if tokens.is_file():
        size = tokens.stat().st_size
        crc = 0
        with open(tokens, "rb") as f:
            for i in range(8):
                f.seek(size * i // 8)
                crc = zlib.crc32(f.read(65536), crc)
        out.update(train_bytes=size, train_sample_crc32=crc)
    return out


# data.* settings recorded since they were found to change a resumed run silently: a checkpoint
# written before lacks them, and its resume compares none of them (it cannot know what they were)
STEP_DATA_FIELDS = ("doc_mask", "shuffle", "synthetic_samples", "mqar_num_kv_pairs", "mqar_curriculum")


def fingerprint(cfg, mcfg, data_path: Path | None) -> dict[str, Any]:
    """The fingerprint of a run (JSON-ready). ``data_path``: the prepared data folder in use, if any."""
    d = cfg.data
    data = {"source": d.source, "tokenizer": d.tokenizer,
            "default_corpus_bytes": d.default_corpus_bytes if d.source == "default" else None,
            "doc_mask": d.doc_mask, "shuffle": d.shuffle,
            "synthetic_samples": d.synthetic_samples if d.source in ("passkey", "mqar") else None,
            "mqar_num_kv_pairs": d.mqar_num_kv_pairs if d.source == "mqar" else None,
            "mqar_curriculum": list(d.mqar_curriculum) if d.source == "mqar" else None}
    if data_path is not None:
        data.update(path=str(Path(data_path).resolve()), **_data_digest(Path(data_path)))
    return {
        "model": dataclasses.asdict(mcfg),
        "data": data,
        "train": {"seq_len": cfg.train.seq_len, "global_batch_size": cfg.train.global_batch_size,
                  "seed": cfg.train.seed},
        "optim": {f: getattr(cfg.optim, f) for f in OPTIM_FIELDS},
    }


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    if isinstance(d, tuple):
        d = list(d)
    return {prefix: d}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``field -> (checkpoint value, current value)`` for every leaf that differs."""
    a, b = _flat(saved, ""), _flat(now, "")
    return {k.lstrip("."): (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(saved: dict[str, Any] | None, now: dict[str, Any], allowed: list[str], where: str) -> list[str]:
    """Refuse a resume that would continue a different run; return the allowed settings that changed.

    Raises:
        ConfigError: the model differs (always), or another setting differs that is not in
            ``checkpoint.allow_changes``; the message names every field with both values.
    """
    if saved is None:  # a checkpoint written before fingerprints: nothing to compare
        return []
    diff = differences(saved, now)
    recorded = saved.get("data", {}) if isinstance(saved.get("data"), dict) else {}
    diff = {k: v for k, v in diff.items()
            if not (k.startswith("data.") and k[5:] in STEP_DATA_FIELDS and k[5:] not in recorded)}
    model = {k: v for k, v in diff.items() if k.startswith("model.")}
    if model:
        fields = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in model.items())
        raise ConfigError("model", f"the checkpoint {where} was trained with a different model ({fields}).",
                          "resume with the checkpoint's model settings; or train this model in a new output_dir; "
                          "or add checkpoint.resume=none to start afresh here (the earlier run's files are moved, "
                          "unchanged, into output_dir/previous-<time>/).")
    changed = sorted({"data" if k.startswith("data.") else k for k in diff})
    refused = [k for k in changed if k not in allowed]
    if refused:
        fields = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items()
                           if ("data" if k.startswith("data.") else k) in refused)
        raise ConfigError("checkpoint.allow_changes", f"resuming {where} with changed settings ({fields}).",
                          f"set checkpoint.allow_changes=[{', '.join(refused)}] to apply them, or restore them.")
    return changed
