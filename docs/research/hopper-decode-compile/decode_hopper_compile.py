"""Offline build of the Hopper decode kernel for sm_90a (no GPU needed): shared memory, registers,
spills, and the SASS of its two loops (instruction counts per tile), for each configuration.

    /path/to/venv-with-triton-3.6/bin/python docs/research/hopper-decode-compile/decode_hopper_compile.py [--dump DIR]

Needs the GPU's Triton release (3.6: the Gluon API moves between releases); torch is optional (a
stub stands in for it, since only the kernel's module-level code runs). cuobjdump comes with Triton.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the repository root


def _load_kernel_module():
    try:
        import torch  # noqa: F401
        sys.path.insert(0, str(ROOT))
        from nanoflow.kernels import decode_attention_hopper
        return decode_attention_hopper
    except ImportError:
        pass
    torch = types.ModuleType("torch")  # the module only names torch dtypes at import time
    for name in ("bfloat16", "float16", "float8_e4m3fn", "float32", "int32", "Tensor", "device"):
        setattr(torch, name, name)
    torch.cuda = types.SimpleNamespace()
    sys.modules["torch"] = torch
    for pkg in ("nanoflow", "nanoflow.kernels"):
        mod = types.ModuleType(pkg)
        mod.__path__ = []
        sys.modules[pkg] = mod
    sys.modules["nanoflow.kernels.decode_attention_plan"] = types.ModuleType("plan")
    sys.modules["nanoflow.kernels"].decode_attention_plan = sys.modules["nanoflow.kernels.decode_attention_plan"]
    parts_spec = importlib.util.spec_from_file_location("nanoflow.kernels.decode_attention_hopper_parts",
                                                        ROOT / "nanoflow/kernels/decode_attention_hopper_parts.py")
    parts = importlib.util.module_from_spec(parts_spec)
    sys.modules[parts_spec.name] = parts
    parts_spec.loader.exec_module(parts)
    spec = importlib.util.spec_from_file_location("decode_attention_hopper",
                                                  ROOT / "nanoflow/kernels/decode_attention_hopper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["decode_attention_hopper"] = module
    spec.loader.exec_module(module)
    return module


def compile_kernel(hk_mod, fp8: bool, head_dim: int, group: int, block_size: int, stages: int, maxnreg: int,
                   num_kv_heads: int = 8, rows_from_device: bool = False, tile: int = 64, pipe: bool = False):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import MockTensor, mangle_type

    kv_tl, kv_gl = (tl.float8e4nv, gl.float8e4nv) if fp8 else (tl.bfloat16, gl.bfloat16)
    kw = head_dim if fp8 else 64
    box = min(block_size, tile)

    def desc(block):
        base = MockTensor(kv_tl, [1 << 20, num_kv_heads * head_dim])
        return TensorDescriptor(base, [1 << 20, num_kv_heads * head_dim], [num_kv_heads * head_dim, 1], block,
                                gl.NVMMASharedLayout.get_default_for(block, kv_gl))
    kd = desc([box, kw])
    sig = {"q_desc": mangle_type(desc([hk_mod.NP, kw])), "k_desc": mangle_type(kd), "v_desc": mangle_type(kd),
           "bt_ptr": "*i32", "lens_ptr": "*i32", "qscale_ptr": "*fp32", "out_ptr": "*bf16",
           "part_o_ptr": "*fp32", "part_ml_ptr": "*fp32", "part_id_ptr": "*i32", "nrows_ptr": "*i32",
           "num_requests": "i32", "row0": "i32", "stride_bt": "i32", "stride_or": "i32", "stride_oh": "i32", "score_scale": "fp32", "out_scale": "fp32"}
    constexprs = dict(NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                      STAGES=stages, FP8=fp8, BLOCK_R=512, ROWS_FROM_DEVICE=rows_from_device,
                      PRODUCER_REGS=48, BT=tile, PIPE=pipe, num_warps=4)
    sig.update({k: "constexpr" for k in constexprs})
    src = GluonASTSource(fn=hk_mod._decode_kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True).stdout


def loop_counts(sass: str) -> dict[str, int]:
    """Instructions of the innermost loop around the first wgmma (consumer) and TMA load (producer)."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    out = {}
    for name, key in (("consumer", "GMMA"), ("producer", "UTMALDG")):
        first = next((i for i, (_, t) in enumerate(ins) if key in t), None)
        best = None
        for i, (_, t) in enumerate(ins):
            m = re.search(r"BRA.*?0x([0-9a-f]+)", t)
            if m and first is not None and int(m.group(1), 16) in index:
                lo = index[int(m.group(1), 16)]
                if lo <= first <= i and (best is None or i - lo < best[1] - best[0]):
                    best = (lo, i)
        out[name] = best[1] - best[0] + 1 if best else -1
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", help="write ptx / sass of each config here")
    args = ap.parse_args()
    hk_mod = _load_kernel_module()
    configs = [  # fp8, D, G, block size, stages, maxnreg, tile tokens
        (False, 128, 4, 16, 3, 128, 64), (False, 128, 4, 64, 3, 128, 64), (False, 128, 4, 16, 6, 255, 64),
        (False, 128, 4, 16, 2, 80, 64), (False, 64, 8, 16, 3, 128, 64), (True, 128, 4, 16, 5, 128, 64),
        (True, 128, 4, 64, 5, 128, 64), (True, 128, 4, 16, 3, 80, 64), (True, 128, 4, 16, 2, 64, 64),
        (True, 128, 4, 16, 2, 128, 128), (True, 128, 4, 64, 2, 128, 128), (True, 128, 4, 16, 2, 80, 128),
        (True, 64, 8, 16, 2, 128, 128), (True, 128, 4, 16, 4, 128, 64, True), (True, 128, 4, 16, 3, 80, 64, True),
        (True, 64, 8, 16, 4, 128, 64, True),
        (False, 128, 4, 16, 4, 128, 64), (True, 128, 4, 16, 4, 128, 64),  # the 4-stage ring (bf16's old default)
    ]
    configs = [c if len(c) == 8 else (*c, False) for c in configs]  # last field: pipeline_pv
    configs = [(*c, False) for c in configs] + [(False, 128, 4, 16, 3, 128, 64, False, True),
                                                (True, 128, 4, 16, 5, 128, 64, False, True),
                                                (True, 128, 4, 16, 2, 128, 128, False, True),
                                                (True, 128, 4, 16, 4, 128, 64, True, True)]
    print(f"{'config':<40} {'smem KB':>8} {'regs':>5} {'spill':>6} {'consumer loop':>14} {'producer loop':>14}")
    for fp8, d, g, bs, st, regs, tile, pipe, dev_rows in configs:
        k = compile_kernel(hk_mod, fp8, d, g, bs, st, regs, rows_from_device=dev_rows, tile=tile, pipe=pipe)
        usage = _cuobjdump(k.asm["cubin"], "--dump-resource-usage")
        reg = re.search(r"REG:(\d+)", usage).group(1)
        local = re.search(r"LOCAL:(\d+)", usage).group(1)
        sass = _cuobjdump(k.asm["cubin"], "--dump-sass")
        loops = loop_counts(sass)
        name = (f"{'fp8' if fp8 else 'bf16'} D{d} G{g} bs{bs} st{st} maxnreg{regs} t{tile}"
                f"{' pipe' if pipe else ''}{' rows' if dev_rows else ''}")
        print(f"{name:<40} {k.metadata.shared / 1024:>8.1f} {reg:>5} {local:>6} {loops['consumer']:>14} "
              f"{loops['producer']:>14}")
        if args.dump:
            out = Path(args.dump)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name.replace(' ', '_')}.ptx").write_text(k.asm["ptx"])
            (out / f"{name.replace(' ', '_')}.sass").write_text(sass)


if __name__ == "__main__":
    main()
