"""Operations of a decoder layer, tagged with the resource they stress.

A layer is a list of Ops; each runs on token rows lo:hi of the dense batch, so a plan can cut the batch
into nano-batches per op without touching the model (NanoFlow §3)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable


COLLECTIVE_OPS = ("o_allreduce", "mlp_allreduce")
"""The network ops tensor parallelism adds to a layer: all-reduces after o_gemm and after the MLP."""


class Resource(str, enum.Enum):
    COMPUTE = "compute"
    MEMORY = "memory"
    NETWORK = "network"


class RowScope(str, enum.Enum):
    """Which rows of the dense batch an op touches; the executor clips nano-batch ranges to it."""
    ALL = "all"            # every token row (GEMMs, norms, activations)
    DECODE = "decode"      # rows of single-token requests (decode attention)
    PREFILL = "prefill"    # rows of multi-token chunks (prefill attention); cut only at request bounds


@dataclass(frozen=True)
class Op:
    name: str
    """Stable op name (plans refer to it): e.g. qkv_gemm, decode_attn."""
    resource: Resource
    """Compute-, memory- or network-bound."""
    fn: Callable[[Any, int, int], None]
    """fn(step_state, lo, hi): do the op for token rows lo:hi."""
    scope: RowScope = RowScope.ALL
    """Rows the op applies to."""
    reads: tuple[str, ...] = ()
    """Workspace buffers whose rows lo:hi the op reads (the executor derives dependencies from these)."""
    writes: tuple[str, ...] = ()
    """Workspace buffers whose rows lo:hi the op writes."""
    replaces: tuple[str, ...] = ()
    """Ops of the dense Llama layer this op does the work of (the MoE block: gate_up_gemm, act,
    down_gemm), so plans written for the dense layer run it (nanoflow.pipeline.plan_fold)."""
