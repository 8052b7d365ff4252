"""The Triton kernels under the reference names (see reference.py for the functions they compute).

Every function takes the reference's positional arguments; extras are keyword-only with defaults:
`out=` (all), `residual_out=` (fused_add_rms_norm), `q_out=` (rope_and_cache_write), and the SM-budget
knobs of the attention kernels (`max_programs`, decode's `num_splits` / `max_seq_len` / `config`).
"""
from __future__ import annotations

from nanoflow.kernels.activation import silu_and_mul
from nanoflow.kernels.decode_attention import paged_decode_attention
from nanoflow.kernels.norm import fused_add_rms_norm, rms_norm
from nanoflow.kernels.prefill_attention import paged_prefill_attention
from nanoflow.kernels.rope import rope_and_cache_write

__all__ = ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_and_cache_write",
           "paged_decode_attention", "paged_prefill_attention"]
