"""Kernel dispatch: Triton kernels on CUDA when enabled, the torch references otherwise.

Both expose the same functions (see reference.py), so the model is written once."""
from __future__ import annotations

from types import ModuleType

import torch

from nanoflow.kernels import reference

def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_kernels(use_triton: str, device: torch.device) -> ModuleType:
    """'auto' takes Triton on CUDA; 'on' forces it (also on CPU through TRITON_INTERPRET=1)."""
    want = use_triton == "on" or (use_triton == "auto" and device.type == "cuda")
    if not want:
        return reference
    if not triton_available():
        if use_triton == "on":
            raise ValueError("use_triton='on' but triton is not installed (pip install triton)")
        return reference
    from nanoflow.kernels import triton_ops
    return triton_ops
