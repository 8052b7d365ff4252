"""GPU tests skip without CUDA. Like tests/kernels, set TRITON_INTERPRET before anything imports
triton: this directory is collected first, and the interpreter must be on for the CPU kernel tests."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
