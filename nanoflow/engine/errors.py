"""Errors a step can raise that the engine must not survive (the step-failure isolation lets every
other error fail only that step's requests)."""
from __future__ import annotations


class StepFatalError(RuntimeError):
    """Raised inside a step when the engine itself can no longer run steps (for example a tensor-parallel
    worker rank is gone): LLMEngine.step() turns it into EngineFatalError at once."""
