"""Rank-0 metrics: progress bar, JSONL file, wandb (offline by default); throughput and MFU."""

from __future__ import annotations

import json
import logging
import re
import resource
from pathlib import Path
from typing import Any

import torch
from longshard.files import append_text, read_regular, write_file
from longshard.models.config import ModelConfig
from torch import nn

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s (no sparsity) of common accelerators, matched on the device name.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def flops_per_token(cfg: ModelConfig, seq_len: int, model: nn.Module | None = None) -> float:
    """Training FLOPs per token: 6 x matmul params + 3 x the attention's forward FLOPs.

    With ``model`` the attention term is what each layer's core attention declares it performs
    (:meth:`~longshard.models.attention.CoreAttention.attention_flops_per_token`: kept blocks of
    sparse variants, chunk + state updates of linear ones); without it, dense causal attention
    (QK^T and PV over the causal half, forward + backward: 6·L·H·D·S).
    """
    n = cfg.num_params(include_embedding=False)
    if cfg.tie_embeddings:  # the output projection is still a matmul
        n += cfg.vocab_size * cfg.dim
    if model is None:
        attn = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    else:
        attn = 3 * sum(layer.attention.core_attention.attention_flops_per_token(seq_len) for layer in model.layers)
    return 6.0 * n + attn


def flops_per_token_torchtitan(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token as torchtitan counts them (``mfu_pct``): 6 x matmul params + 12·L·H·D·S,
    the attention's full S x S product whatever the mask or the variant (no causal half, no sparsity)."""
    n = cfg.num_params(include_embedding=False)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.dim
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_query_heads * cfg.head_dim * seq_len


def window_memory(device: torch.device) -> dict[str, float]:
    """torchtitan's memory figures since the last call, in GiB (CUDA; nothing elsewhere): the most memory the
    caching allocator reserved and the most held by live tensors; their peaks are reset for the next window."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    out = {"memory/max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
           "memory/max_active_gib": stats.get("active_bytes.all.peak", 0) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Peak TFLOP/s for MFU; None when unknown (e.g. CPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated (CUDA) or peak resident set size of the process (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsLogger:
    """Writes metrics on rank 0 to ``metrics.jsonl``, wandb and a tqdm progress bar.

    Args:
        output_dir: run folder.
        enabled: True on rank 0 only.
        total_steps: steps for the progress bar.
        start_step: first step of this run (resume).
        wandb_mode: ``offline``, ``online`` or ``disabled``.
        project, run_name, group: wandb identifiers.
        config: run config logged to wandb.
        progress: show the progress bar.
    """

    def __init__(
        self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int, wandb_mode: str,
        project: str, run_name: str, group: str, config: dict[str, Any], progress: bool,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.lost_records = 0  # records metrics.jsonl could not take (disk full ...)
        self.wandb_run = None
        self._wandb_dir: str | None = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(  # quiet: no 35-line run summary at exit (the report says it)
                mode=wandb_mode, dir=str(output_dir), project=project, name=run_name, group=group,
                config=config, reinit="finish_previous", settings=wandb.Settings(quiet=True),
                id=wandb_run_id(output_dir), resume="allow",  # a resumed run (or a rerun) continues it
            )
            self._wandb_dir = str(Path(self.wandb_run.dir).parent)
        if progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True)
            # log lines (checkpoint saved, evaluation) go above the bar instead of onto it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for ``step``."""
        if not self.enabled:
            return
        rec = {"step": step, **metrics}
        try:
            append_text(self.path, json.dumps(rec) + "\n")
        except OSError as e:  # a full or vanished disk must not stop training (or leave ranks hanging)
            self.lost_records += 1
            if self.lost_records == 1:
                log.warning("could not append to %s (%s): training goes on; metrics of this and later failing steps "
                            "go only to wandb and the progress bar. Free space in output_dir or move it.",
                            self.path, e.strerror or e)
        self._wandb("log", lambda run: run.log(metrics, step=step))
        if self.bar is not None:
            self.bar.n = step
            show = {k: metrics[k] for k in ("loss", "tokens_per_s", "mfu", "peak_mem_gb") if metrics.get(k) is not None}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in show.items()}, refresh=True)

    def summary(self, values: dict[str, Any]) -> None:
        """Final values (wandb run summary)."""

        def write(run) -> None:
            for k, v in values.items():
                if isinstance(v, (int, float, str)):
                    run.summary[k] = v

        self._wandb("summary", write)

    def _wandb(self, what: str, op) -> None:
        """Run ``op(wandb_run)``; a failure of wandb (its service process stopped: Slurm signals every
        process of a job step, wandb's included) is logged once and ends wandb logging for this run.
        The run's own files (metrics.jsonl, checkpoints, report.json) never depend on it."""
        if self.wandb_run is None:
            return
        try:
            op(self.wandb_run)
        except Exception as e:  # wandb raises ConnectionResetError, BrokenPipeError, its own errors ...
            log.warning("wandb %s failed (%s: %s); wandb logging stops here, the run's own files are complete%s",
                        what, type(e).__name__, str(e)[:200],
                        "; `wandb sync` the offline run later" if self._wandb_dir else "")
            self.wandb_run = None

    @property
    def wandb_dir(self) -> str | None:
        return self._wandb_dir

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar and the wandb run (once; later calls do nothing). Leaving a ``with`` block calls it."""
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None
        self._wandb("finish", lambda run: run.finish())
        self.wandb_run = None


WANDB_ID_FILE = "longshard_run_id"  # inside output_dir/wandb/: set aside with it by checkpoint.resume=none
_WANDB_ID = re.compile(r"^[a-z0-9]{8,64}$")


def wandb_run_id(output_dir: str | Path, create: bool = True) -> str | None:
    """The wandb run id of the run in ``output_dir``: every ``train`` of that folder (a resume, a rerun of a
    finished run) and every ``eval`` of its checkpoints log to that one wandb run instead of adding another.
    Created on first use (``create``); an unreadable or malformed id file is replaced by a new id."""
    file = Path(output_dir) / "wandb" / WANDB_ID_FILE
    try:
        found = read_regular(file, 256).decode().strip()
        if _WANDB_ID.match(found):
            return found
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    if not create:
        return None
    import secrets

    new = secrets.token_hex(8)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_file(file, new + "\n")
    return new


def human_summary(report: dict[str, Any]) -> str:
    """A few lines for people at the end of a run (``report.json`` keeps everything for machines)."""
    losses = report.get("losses") or []
    start = report.get("resumed_from_step") or 0
    layout = f"dp {report['world_size'] // (report['sp_degree'] * report['tp_degree'])} x sp {report['sp_degree']}" \
             f" x tp {report['tp_degree']}"
    skipped = report.get("skipped_steps") or 0
    head = f"{report['name']} finished: {max(report['steps'] - start, 0)} steps" + \
        (f" (resumed from step {start})" if start else "") + \
        (f", {skipped} update(s) skipped (non-finite; steps {report.get('skipped_at')})" if skipped else "")
    if report.get("preempted_at_step") is not None:
        head = f"{report['name']} stopped cleanly at step {report['preempted_at_step']}, checkpoint " \
               f"{report.get('checkpoint')} (pre-empted; resume with checkpoint.resume=auto)"
    lines = [f"{head} in {report['wall_s']:.1f} s ({report['world_size']} process(es) on {report['device']}, "
             f"{layout})"]
    if losses:
        last = f"step {len(losses)}" if not skipped else f"update {len(losses)}"
        lines.append(f"  training loss {losses[0]:.4g} (step 1) -> {losses[-1]:.4g} ({last})")
    if report.get("conversion"):
        c = report["conversion"]
        lines.append(f"  conversion: held-out loss {c['original_loss']:.4g} as loaded, {c['converted_loss']:.4g} "
                     f"converted (gap {c['loss_gap']:+.3g})")
    t = report.get("sp_traffic")
    if t:
        lines.append(f"  sequence parallel: the sparse K/V exchange of {t['sparse_exchange_layers']} layer(s) sent "
                     f"{t['sparse_exchange_bytes_per_step'] / 1e6:.3g} MB per step on rank 0, a dense ring "
                     f"{t['dense_ring_bytes_per_step'] / 1e6:.3g} MB ({100 * t['saved_fraction']:.0f}% saved)")
    evals = []
    if report.get("val_loss") is not None:
        evals.append(f"held-out loss {report['val_loss']:.4g} (ppl {report['val_ppl']:.4g})")
    evals += [f"{k} {v:.4g}" for k, v in report.items() if k.startswith(("ppl@", "mqar_acc")) and v is not None]
    seq_len = report.get("seq_len") or 0
    passkey = [f"@{k.split('@')[1]} {v:.2f}" + (" (extrapolation)" if seq_len and int(k.split("@")[1]) > seq_len
                                                  else "")
               for k, v in report.items() if k.startswith("passkey_acc@")]
    if passkey:
        probe = "" if report.get("data_source") == "passkey" else " (a probe: not trained on passkeys, expect ~0 " \
            "at small budgets)"
        evals.append("passkey accuracy " + ", ".join(passkey) + probe)
    if evals:
        lines.append("  evaluated: " + "; ".join(evals))
    files = [f"report {Path(report['metrics_file']).parent / 'report.json'}", f"metrics {report['metrics_file']}"]
    if report.get("checkpoint"):
        files.insert(0, f"checkpoint {report['checkpoint']}")
    if report.get("wandb_dir"):
        files.append(f"wandb {report['wandb_dir']} (offline runs: `wandb sync` it)")
    lines.append("  files: " + ", ".join(files))
    return "\n".join(lines)
