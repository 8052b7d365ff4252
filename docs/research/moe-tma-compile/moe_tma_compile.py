"""Offline build of the grouped MoE GEMM's TMA kernels and the fused expert sort for sm_90a with the GPU's Triton (3.6), no GPU:
does each configuration compile, its shared memory, and whether the flattened loop kept
TMA loads and wgmma (counts in the SASS).

    /path/to/venv-with-triton-3.6/bin/python docs/research/moe-tma-compile/moe_tma_compile.py

torch is optional: a stub stands in for it (the module only names torch dtypes at import time).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def load_module(name: str = "moe_gemm_tma"):
    try:
        import torch  # noqa: F401
        sys.path.insert(0, str(ROOT))
        return importlib.import_module(f"nanoflow.kernels.{name}")
    except ImportError:
        pass
    torch = types.ModuleType("torch")
    for dtype in ("bfloat16", "float16", "float32", "int32", "Tensor"):
        setattr(torch, dtype, dtype)
    sys.modules["torch"] = torch
    if name == "moe_align":  # it imports max_aligned_blocks from the reference module
        for pkg in ("nanoflow", "nanoflow.kernels"):
            mod = types.ModuleType(pkg)
            mod.__path__ = []
            sys.modules[pkg] = mod
        ref = types.ModuleType("nanoflow.kernels.moe_reference")
        ref.max_aligned_blocks = None
        sys.modules[ref.__name__] = ref
    spec = importlib.util.spec_from_file_location(name, ROOT / f"nanoflow/kernels/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_align(mod):
    """The three launches of moe_align_fused for Mixtral (8 experts) and a 128-expert model."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    out = []
    for experts in (8, 128):
        e_pad = max(16, triton.next_power_of_2(experts))
        kernels = [
            (mod._histogram_kernel, {"ids_ptr": "*i64", "counts_ptr": "*i32", "n": "i32"},
             dict(NUM_EXPERTS=experts, E_PAD=e_pad, CHUNK=1024)),
            (mod._plan_kernel, {"counts_ptr": "*i32", "start_ptr": "*i32", "block_expert_ptr": "*i32",
                                "used_ptr": "*i32", "num_blocks": "i32"},
             dict(NUM_EXPERTS=experts, E_PAD=e_pad, BLOCK_M=128, CHUNK_B=max(16, 8192 // e_pad))),
            (mod._scatter_kernel, {"ids_ptr": "*i64", "start_ptr": "*i32", "cursor_ptr": "*i32",
                                   "sorted_ptr": "*i32", "n": "i32"}, dict(CHUNK=1024)),
        ]
        for fn, sig, constexprs in kernels:
            sig = dict(sig, **{k: "constexpr" for k in constexprs})
            try:
                triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
                out.append(f"{fn.__name__} E={experts}: ok")
            except Exception as exc:
                out.append(f"{fn.__name__} E={experts}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
    return out


def compile_one(mod, kernel: str, bm: int, bn: int, bk: int, warps: int, stages: int):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import MockTensor, mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(block):
        return mangle_type(TensorDescriptor(MockTensor(tl.bfloat16, [1 << 16, 4096]), [1 << 16, 4096], [4096, 1], block))
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, DOT_PRECISION="tf32")
    if kernel == "gate_up":
        fn = mod._gate_up_silu_tma_kernel
        sig = {"xs_desc": desc([bm, bk]), "w_desc": desc([bn, bk]), "h_desc": desc([bm, bn]),
               "block_expert_ptr": "*i32", "used_blocks_ptr": "*i32", "N": "i32", "K": "i32"}
        constexprs = dict(common, OUT_DTYPE=tl.bfloat16)
    else:
        fn = mod._down_tma_kernel
        sig = {"h_desc": desc([bm, bk]), "w_desc": desc([bn, bk]), "y_ptr": "*bf16", "sorted_ptr": "*i32",
               "block_expert_ptr": "*i32", "used_blocks_ptr": "*i32", "num_assignments": "i32", "N": "i32",
               "K": "i32", "stride_ym": "i32"}
        constexprs = common
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def sass_counts(cubin: bytes) -> dict[str, int]:
    import triton
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    return {"UTMALDG": sass.count("UTMALDG"), "HGMMA": sass.count("HGMMA"), "UTMASTG": sass.count("UTMASTG")}


def main():
    mod = load_module()
    configs = [("gate_up", 16, 64, 128, 4, 4), ("gate_up", 64, 128, 64, 4, 4), ("gate_up", 128, 128, 64, 8, 3),
               ("gate_up", 128, 128, 64, 8, 4), ("down", 16, 64, 128, 4, 4), ("down", 64, 128, 64, 4, 4),
               ("down", 128, 256, 64, 8, 3), ("down", 128, 128, 64, 8, 4)]
    print(f"{'kernel':<8} {'tile':<12} {'w':>2} {'st':>2} {'smem KB':>8}  SASS counts (HGMMA 0: mma.sync, M < 64)")
    for kernel, bm, bn, bk, warps, stages in configs:
        try:
            k = compile_one(mod, kernel, bm, bn, bk, warps, stages)
        except Exception as exc:  # report and go on: every configuration is a row
            print(f"{kernel:<8} {bm}x{bn}x{bk:<5} {warps:>2} {stages:>2}  FAILED {type(exc).__name__}: {str(exc)[:400]}")
            continue
        md = k.metadata
        print(f"{kernel:<8} {bm}x{bn}x{bk:<5} {warps:>2} {stages:>2} {md.shared / 1024:8.1f}  "
              f"{sass_counts(k.asm['cubin'])}")
    print("\nmoe_align_fused (nanoflow/kernels/moe_align.py):")
    for line in compile_align(load_module("moe_align")):
        print("  " + line)


if __name__ == "__main__":
    main()
