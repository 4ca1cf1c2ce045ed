"""Rotary position embeddings with linear / NTK / YaRN / Llama-3.1 context-extension scaling."""

from __future__ import annotations

import math

import torch
from longshard.models.config import RopeConfig
from torch import nn


def rope_inv_freq(cfg: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale for a RoPE config.

    Args:
        cfg: RoPE settings.
        head_dim: rotated dimension (even).

    Returns:
        ``(inv_freq, attention_scale)``; ``attention_scale`` multiplies cos and sin (YaRN only).
    """
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = cfg.theta
    if cfg.scaling == "ntk":
        base = base * cfg.factor ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    scale = 1.0
    if cfg.scaling == "linear":
        inv_freq = inv_freq / cfg.factor
    elif cfg.scaling == "yarn":
        inv_freq, scale = _yarn(cfg, dim, exponents)
    elif cfg.scaling == "llama3":
        inv_freq = _llama3(cfg, inv_freq)
    return inv_freq, scale


def _yarn(cfg: RopeConfig, dim: int, exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, linear ramp between (Peng et al. 2023)."""
    base, factor, orig = cfg.theta, cfg.factor, cfg.original_max_seq_len

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 = keep the original frequency
    pos_freqs = base**exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    scale = cfg.attention_factor
    if scale is None:
        def mscale(m: float = 1.0) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        scale = mscale(cfg.mscale) / mscale(cfg.mscale_all_dim) if cfg.mscale and cfg.mscale_all_dim else mscale()
    return inv_freq, float(scale)


def _llama3(cfg: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1: divide long wavelengths by ``factor``, keep short ones, smooth in between."""
    orig, factor = cfg.original_max_seq_len, cfg.factor
    low_wavelen = orig / cfg.low_freq_factor
    high_wavelen = orig / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for given position ids.

    Args:
        cfg: RoPE settings.
        head_dim: rotated dimension.
    """

    def __init__(self, cfg: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = head_dim
        inv_freq, self.attention_scale = rope_inv_freq(cfg, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequency buffer, e.g. after meta-device init."""
        inv_freq, _ = rope_inv_freq(self.cfg, self.head_dim)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, S, head_dim) in ``dtype``; computed in fp32."""
        freqs_BSX = position_ids_BS[..., None].float() * self.inv_freq.float()
        emb_BSD = torch.cat((freqs_BSX, freqs_BSX), dim=-1)
        cos = emb_BSD.cos() * self.attention_scale
        sin = emb_BSD.sin() * self.attention_scale
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim halves (the Llama/HF convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, H, S, D) by position.

    The rotation runs in the precision of the tables (fp32 from :class:`RotaryEmbedding`) and the
    result is cast back to ``x_BHSD``'s dtype, so under bf16 autocast the core attention receives
    bf16 q/k (as HF and torchtitan do); in fp32 nothing is cast.
    """
    cos, sin = cos_BSD[:, None], sin_BSD[:, None]
    x = x_BHSD.to(cos.dtype)
    return (x * cos + rotate_half(x) * sin).to(x_BHSD.dtype)
