"""RoPE cos/sin cache with default, linear and llama3 frequency scaling (as transformers computes them)."""
from __future__ import annotations

import math

import torch

from nanoflow.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling, cfg.max_position_embeddings)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict, max_pos: int) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", max_pos)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """[max_position_embeddings, head_dim] fp32: cos of the D/2 frequencies, then their sin."""
    inv_freq = inverse_frequencies(cfg).to(device)
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)
