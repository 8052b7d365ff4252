"""Kernel tests run the Triton kernels on the GPU when there is one, else through Triton's
interpreter. TRITON_INTERPRET must be set before triton (and any @triton.jit module) is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """A fixed-seed generator: fresh random data per test, same data every run."""
    return torch.Generator().manual_seed(1234)
