"""ModelKernels: the kernel set is chosen once (EngineConfig.use_triton) and passed to the model,
whose ops call exactly that set."""
from __future__ import annotations

import dataclasses

import torch

from nanoflow.config import EngineConfig
from nanoflow.kernels import REFERENCE_KERNELS, ModelKernels, reference, select_kernels
from nanoflow.models.llama import LlamaForCausalLM, StepState
from nanoflow.models.loader import load_model
from nanoflow.models.presets import PRESETS

CPU = torch.device("cpu")
FUNCTIONS = [f.name for f in dataclasses.fields(ModelKernels) if f.name not in ("name", "graph_safe")]


def test_both_sets_hold_their_modules_functions():
    from nanoflow.kernels import triton_ops
    triton = select_kernels("on", CPU)
    assert (triton.name, triton.graph_safe) == ("triton", True)
    assert (REFERENCE_KERNELS.name, REFERENCE_KERNELS.graph_safe) == ("reference", False)
    for name in FUNCTIONS:
        assert getattr(triton, name) is getattr(triton_ops, name)
        assert getattr(REFERENCE_KERNELS, name) is getattr(reference, name)


def test_select_kernels_keeps_the_references_off_cuda_unless_forced():
    assert select_kernels("auto", CPU) is REFERENCE_KERNELS
    assert select_kernels("off", CPU) is REFERENCE_KERNELS
    assert LlamaForCausalLM(PRESETS["default"], torch.float32, torch.device("meta")).kernels is REFERENCE_KERNELS


def test_load_model_passes_the_configured_set():
    assert load_model(EngineConfig(use_triton="off"), CPU, torch.float32)[0].kernels is REFERENCE_KERNELS
    model, _ = load_model(EngineConfig(use_triton="on"), CPU, torch.float32)
    assert model.kernels.name == "triton"


def test_the_ops_call_the_set_the_model_was_given():
    calls = []

    def counting_linear(*args, **kwargs):
        calls.append(kwargs.get("sm_budget"))
        return reference.linear(*args, **kwargs)

    kernels = dataclasses.replace(REFERENCE_KERNELS, linear=counting_linear)
    model = LlamaForCausalLM(PRESETS["default"], torch.float32, CPU, kernels=kernels)
    ws = model.new_workspace(4)
    ws.normed.normal_()
    qkv_gemm = next(op for op in model.layers[0].ops if op.name == "qkv_gemm")
    qkv_gemm.fn(StepState(None, ws, [], sm_budget=7), 0, 4)
    assert calls == [7]
