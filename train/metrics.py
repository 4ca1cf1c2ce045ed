"""Rank-0 metrics: progress bar, JSONL file, wandb (offline by default); throughput and MFU."""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any

import torch
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
        self.wandb_run = None
        self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                mode=wandb_mode, dir=str(output_dir), project=project, name=run_name, group=group,
                config=config, reinit="finish_previous",
            )
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for ``step``."""
        if not self.enabled:
            return
        rec = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.bar is not None:
            self.bar.n = step
            show = {k: metrics[k] for k in ("loss", "tokens_per_s", "mfu", "peak_mem_gb") if metrics.get(k) is not None}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in show.items()}, refresh=True)

    def summary(self, values: dict[str, Any]) -> None:
        """Final values (wandb run summary)."""
        if self.wandb_run is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str)):
                    self.wandb_run.summary[k] = v

    @property
    def wandb_dir(self) -> str | None:
        return None if self.wandb_run is None else str(Path(self.wandb_run.dir).parent)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
