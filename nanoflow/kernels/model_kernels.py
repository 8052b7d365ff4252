"""ModelKernels: the set of kernel functions a model runs, passed to its constructor.

Two sets exist: the torch references (nanoflow.kernels.reference: any device, the CPU path, and the
definition every Triton kernel is tested against) and the Triton kernels (nanoflow.kernels.triton_ops).
Both take the same arguments, so the model is written once; select_kernels picks one."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from nanoflow.kernels import reference

Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ModelKernels:
    """The functions the decoder layers call; each field's contract is the reference function of the
    same name (nanoflow.kernels.reference), which documents its shapes and arguments."""
    name: str
    """'reference' (plain torch) or 'triton'."""
    graph_safe: bool
    """The kernels never sync with the host, so CUDA graphs can capture them (not the references:
    they read lengths on the host)."""
    linear: Kernel
    """x @ weight.T (+ bias) into `out`; `sm_budget` confines the GEMM to that many SMs."""
    rms_norm: Kernel
    """RMSNorm (the final norm before the LM head)."""
    fused_add_rms_norm: Kernel
    """residual += x, then RMSNorm of the sum (the norms before attention and MLP)."""
    silu_and_mul: Kernel
    """silu(gate) * up of the fused gate_up projection."""
    rope_and_cache_write: Kernel
    """Rotary embedding of q and k, and the k / v write into the paged KV cache."""
    paged_decode_attention: Kernel
    """Attention of one query token per request over its paged context (eager decode rows)."""
    paged_decode_attention_rows: Kernel
    """paged_decode_attention with the decode row count read on the device (CUDA graphs)."""
    paged_prefill_attention: Kernel
    """Causal attention of a chunk of prompt tokens per request over its paged context."""
    paged_prefill_attention_rows: Kernel
    """paged_prefill_attention with the request range read on the device (CUDA graphs)."""
    moe_experts: Kernel
    """The routed experts' SwiGLU MLPs of a mixture-of-experts layer (Mixtral)."""

    @classmethod
    def from_module(cls, module: ModuleType, name: str, graph_safe: bool) -> "ModelKernels":
        """The set made of the functions a kernel module defines under the field names."""
        functions = {f: getattr(module, f) for f in cls.__dataclass_fields__ if f not in ("name", "graph_safe")}
        return cls(name=name, graph_safe=graph_safe, **functions)


REFERENCE_KERNELS = ModelKernels.from_module(reference, "reference", graph_safe=False)
"""The torch references: the CPU path."""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_kernels() -> ModelKernels:
    """The Triton set (imports Triton; on CPU it runs only under TRITON_INTERPRET=1)."""
    from nanoflow.kernels import triton_ops
    return ModelKernels.from_module(triton_ops, "triton", graph_safe=True)


def select_kernels(use_triton: str, device: torch.device) -> ModelKernels:
    """EngineConfig.use_triton: 'auto' takes Triton on CUDA, the references elsewhere; 'on' forces
    Triton (also on CPU through TRITON_INTERPRET=1); 'off' the references."""
    want = use_triton == "on" or (use_triton == "auto" and device.type == "cuda")
    if not want:
        return REFERENCE_KERNELS
    if not triton_available():
        if use_triton == "on":
            raise ValueError("use_triton='on' but triton is not installed (pip install triton)")
        return REFERENCE_KERNELS
    return triton_kernels()
