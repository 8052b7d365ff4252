"""Kernels: Triton kernels on CUDA when enabled, the torch references otherwise.

Both expose the same functions (see reference.py); the model receives one set as a ModelKernels
(model_kernels.py), so it is written once."""
from __future__ import annotations

from nanoflow.kernels.model_kernels import REFERENCE_KERNELS, ModelKernels, select_kernels, triton_available

__all__ = ["REFERENCE_KERNELS", "ModelKernels", "select_kernels", "triton_available"]
