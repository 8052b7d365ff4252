"""Times every Triton kernel on Llama-3-8B shapes (bf16, and FP8 KV caches), with each timed
configuration's relative error against its torch reference beside it.

    python benchmarks/kernels_gpu.py            # ~1-2 min on an H200 (most of it Triton compiles)
    python benchmarks/kernels_gpu.py --quick    # skip the decode launch-config sweep

Timing: triton.testing.do_bench, median. GB/s = bytes the kernel must move / time (decode attention:
K and V bytes read; FP8 caches count 1 byte per cached element). The rel err column is
||out - ref|| / ||ref|| on fresh random data; the run exits 1 if a timed configuration is off by
1e-2 or more (2e-2 on fp8 caches), so no wrong kernel is timed silently. The correctness tests
themselves (fp8 saturation, bit-identical V cache, SM partitions, ...) are tests/gpu/test_kernels_gpu.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow.kernels import decode_attention_persistent as dap  # noqa: E402
from nanoflow.kernels import prefill_attention, reference, rope, triton_ops  # noqa: E402
from nanoflow.kernels import decode_attention  # noqa: E402
from nanoflow.kernels.decode_attention import (  # noqa: E402
    DecodeConfig, choose_num_splits, default_config, num_sms)

HIDDEN, INTER, HQ, HK, D, BLOCK = 4096, 14336, 32, 8, 128, 16
DT = torch.bfloat16
DEV = torch.device("cuda")
TOL = 1e-2
FP8 = torch.float8_e4m3fn
FP8_TOL = 2e-2


class Report:
    def __init__(self):
        self.failures: list[str] = []

    def check(self, name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> float:
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
        if not err < tol:  # also catches NaN
            self.failures.append(f"{name}: rel err {err:.2e}")
        return err

    def row(self, kernel: str, shape: str, ms: float, nbytes: float, err: float | None, extra: str = ""):
        gbs = nbytes / ms / 1e6
        err_s = "" if err is None else f"{err:.1e}"
        print(f"{kernel:<26} {shape:<40} {ms:9.4f} {gbs:9.0f} {err_s:>8}  {extra}", flush=True)


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(DT)


def header(title: str):
    print(f"\n== {title}")
    print(f"{'kernel':<26} {'shape':<40} {'ms':>9} {'GB/s':>9} {'rel err':>8}")


def bench_elementwise(rep: Report, tokens: int):
    header("norm / activation / rope")
    x, res, w = rand(tokens, HIDDEN), rand(tokens, HIDDEN), rand(HIDDEN)
    err = rep.check("rms_norm", triton_ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    ms = bench(lambda: triton_ops.rms_norm(x, w, 1e-5))
    rep.row("rms_norm", f"[{tokens}, {HIDDEN}]", ms, 2 * x.numel() * 2, err)

    got, got_res = triton_ops.fused_add_rms_norm(x, res, w, 1e-5)
    want, want_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    err = max(rep.check("fused_add_rms_norm", got, want),
              rep.check("fused_add_rms_norm.res", got_res, want_res))
    ms = bench(lambda: triton_ops.fused_add_rms_norm(x, res, w, 1e-5))
    rep.row("fused_add_rms_norm", f"[{tokens}, {HIDDEN}]", ms, 4 * x.numel() * 2, err)

    gu = rand(tokens, 2 * INTER, scale=2.0)
    err = rep.check("silu_and_mul", triton_ops.silu_and_mul(gu), reference.silu_and_mul(gu))
    ms = bench(lambda: triton_ops.silu_and_mul(gu))
    rep.row("silu_and_mul", f"[{tokens}, {2 * INTER}]", ms, gu.numel() * 2 * 3 // 2, err)

    qkv = rand(tokens, (HQ + 2 * HK) * D)
    q, k, v = (t.view(tokens, -1, D) for t in qkv.split([HQ * D, HK * D, HK * D], dim=-1))
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(8192, device=DEV, dtype=torch.float32), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    num_blocks = tokens // BLOCK + 64
    slots = torch.randperm(num_blocks * BLOCK, device=DEV)[:tokens]
    kc, vc = rand(num_blocks, BLOCK, HK, D), rand(num_blocks, BLOCK, HK, D)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    got_q = triton_ops.rope_and_cache_write(q, k, v, positions, cos_sin, kc, vc, slots)
    want_q = reference.rope_and_cache_write(q, k, v, positions, cos_sin, kc_ref, vc_ref, slots)
    err = max(rep.check("rope.q", got_q, want_q), rep.check("rope.k_cache", kc, kc_ref),
              rep.check("rope.v_cache", vc, vc_ref))
    ms = bench(lambda: triton_ops.rope_and_cache_write(q, k, v, positions, cos_sin, kc, vc, slots))
    rep.row("rope_and_cache_write", f"T={tokens} Hq={HQ} Hk={HK} D={D}", ms, 2 * qkv.numel() * 2, err)


def make_cache(seq_lens: torch.Tensor):
    """K/V caches holding every request's context in shuffled blocks, and the block tables."""
    blocks = (seq_lens + BLOCK - 1) // BLOCK
    max_blocks = int(blocks.max())
    num_blocks = int(blocks.sum())
    perm = torch.randperm(num_blocks, device=DEV, dtype=torch.int32)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32, device=DEV)
    cols = torch.arange(max_blocks, device=DEV)
    mask = cols[None, :] < blocks[:, None]
    table[mask] = perm
    return rand(num_blocks, BLOCK, HK, D), rand(num_blocks, BLOCK, HK, D), table


def bench_decode(rep: Report, cases, budgets, sm_count: int):
    header("paged decode attention (GB/s = K+V bytes read / time)")
    for r, ctx, ragged in cases:
        if ragged:  # lengths uniform in [ctx/2, 3ctx/2]
            lens = torch.randint(ctx // 2, 3 * ctx // 2 + 1, (r,), device=DEV, dtype=torch.int32)
        else:
            lens = torch.full((r,), ctx, device=DEV, dtype=torch.int32)
        kc, vc, table = make_cache(lens)
        q = rand(r, HQ, D)
        scale = D ** -0.5
        want = reference.paged_decode_attention(q, kc, vc, table, lens, scale)
        kv_bytes = int(lens.sum()) * HK * D * 2 * 2
        for budget in budgets:
            splits = choose_num_splits(r, HK, sm_count, budget, int(lens.max()))
            cfg = default_config(budget, sm_count, D, 2)
            got = triton_ops.paged_decode_attention(q, kc, vc, table, lens, scale, max_programs=budget,
                                                    max_seq_len=int(lens.max()))
            err = rep.check(f"decode R={r} ctx={ctx} budget={budget}", got, want)
            ms = bench(lambda: triton_ops.paged_decode_attention(
                q, kc, vc, table, lens, scale, max_programs=budget, max_seq_len=int(lens.max())))
            name = f"R={r} ctx={ctx}{'~' if ragged else ''} grid={'full' if budget is None else budget}"
            rep.row("paged_decode_attention", name, ms, kv_bytes, err,
                    f"splits={splits} bn={cfg.block_n} w={cfg.num_warps} st={cfg.num_stages}")
        del kc, vc


def sweep_decode(rep: Report, r: int, ctx: int, budgets, configs):
    header(f"decode config sweep, R={r} ctx={ctx}")
    lens = torch.full((r,), ctx, device=DEV, dtype=torch.int32)
    kc, vc, table = make_cache(lens)
    q = rand(r, HQ, D)
    want = reference.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5)
    kv_bytes = int(lens.sum()) * HK * D * 2 * 2
    for budget in budgets:
        for cfg in configs:
            def run():
                return triton_ops.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5,
                                                         max_programs=budget, config=cfg)
            try:
                err = rep.check(f"sweep {cfg} budget={budget}", run(), want)
            except OutOfResources as exc:
                print(f"{'  skipped':<26} grid={budget} {cfg}: {exc}")
                continue
            rep.row("paged_decode_attention", f"grid={'full' if budget is None else budget}",
                    bench(run), kv_bytes, err, f"bn={cfg.block_n} w={cfg.num_warps} st={cfg.num_stages}")


def bench_prefill(rep: Report, cases):
    header("paged prefill attention (chunked; GB/s column = K+V bytes read once; TFLOP/s in notes)")
    for chunks in cases:  # list of (cached context, new tokens)
        lens = torch.tensor([c + n for c, n in chunks], device=DEV, dtype=torch.int32)
        qsl = torch.tensor([0] + [n for _, n in chunks], device=DEV).cumsum(0).to(torch.int32)
        kc, vc, table = make_cache(lens)
        q = rand(int(qsl[-1]), HQ, D)
        scale = D ** -0.5
        got = triton_ops.paged_prefill_attention(q, kc, vc, table, qsl, lens, scale)
        want = reference.paged_prefill_attention(q, kc, vc, table, qsl, lens, scale)
        err = rep.check(f"prefill {chunks}", got, want)
        ms = bench(lambda: triton_ops.paged_prefill_attention(q, kc, vc, table, qsl, lens, scale))
        # causal: query i of a chunk at context c sees c + i + 1 keys
        pairs = sum(n * c + n * (n + 1) // 2 for c, n in chunks)
        tflops = 4 * D * HQ * pairs / ms / 1e9
        kv_bytes = int(lens.sum()) * HK * D * 2 * 2
        rep.row("paged_prefill_attention", " ".join(f"{c}+{n}" for c, n in chunks), ms, kv_bytes, err,
                f"{tflops:.0f} TFLOP/s")


def _reference_on_fp8(fn, *args, **kwargs):
    """The reference on the fp8 caches; if this torch cannot index fp8 CUDA tensors, on exact bf16
    copies of them (the same values: _attend widens to fp32 either way), said in the output."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as exc:
        print(f"  note: reference on fp8 caches failed ({str(exc).splitlines()[0][:100]}); "
              "using exact bf16 copies of the fp8 caches")
        return fn(*[a.to(DT) if isinstance(a, torch.Tensor) and a.dtype == FP8 else a for a in args],
                  **kwargs)


def fp8_rope(rep: Report, tokens: int):
    header("FP8 KV cache: rope_and_cache_write (vs the reference on the same fp8 cache)")
    qkv = rand(tokens, (HQ + 2 * HK) * D)
    positions = torch.randint(0, 8192, (tokens,), device=DEV)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(8192, device=DEV, dtype=torch.float32), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    num_blocks = tokens // BLOCK + 64
    slots = torch.randperm(num_blocks * BLOCK, device=DEV)[:tokens]
    q, k, v = (t.view(tokens, -1, D) for t in qkv.split([HQ * D, HK * D, HK * D], dim=-1))
    k, v = k.contiguous(), v.contiguous()
    kc = torch.zeros(num_blocks, BLOCK, HK, D, device=DEV).to(FP8)
    vc = torch.zeros_like(kc)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    got_q = rope.rope_and_cache_write(q, k, v, positions, cos_sin, kc, vc, slots)
    want_q = reference.rope_and_cache_write(q, k, v, positions, cos_sin, kc_ref, vc_ref, slots)
    err = max(rep.check("fp8 rope.q", got_q, want_q, FP8_TOL),
              rep.check("fp8 rope.k_cache", kc, kc_ref, FP8_TOL),
              rep.check("fp8 rope.v_cache", vc, vc_ref, FP8_TOL))
    ms = bench(lambda: rope.rope_and_cache_write(q, k, v, positions, cos_sin, kc, vc, slots))
    nbytes = qkv.numel() * 2 + tokens * HQ * D * 2 + 2 * tokens * HK * D  # fp8 writes: 1 B
    rep.row("rope_and_cache_write fp8", f"T={tokens} Hq={HQ} Hk={HK} D={D}", ms, nbytes, err)


def fp8_decode(rep: Report, cases, sm_count: int):
    header("FP8 KV cache: paged decode attention (GB/s = K+V bytes read at 1 B / element)")
    scale = D ** -0.5
    for r, ctx, ragged in cases:
        if ragged:
            lens = torch.randint(ctx // 2, 3 * ctx // 2 + 1, (r,), device=DEV, dtype=torch.int32)
        else:
            lens = torch.full((r,), ctx, device=DEV, dtype=torch.int32)
        kc16, vc16, table = make_cache(lens)
        kc, vc = kc16.to(FP8), vc16.to(FP8)
        kc16, vc16 = kc.to(DT), vc.to(DT)  # bf16 baseline on the same values
        q = rand(r, HQ, D)
        want = _reference_on_fp8(reference.paged_decode_attention, q, kc, vc, table, lens, scale)
        elems = int(lens.sum()) * HK * D * 2
        name = f"R={r} ctx={ctx}{'~' if ragged else ''}"
        max_len = int(lens.max())
        for budget in (None, 66, 44):
            cfg = default_config(budget, sm_count, D, 2)
            big = DecodeConfig(min(256, 2 * cfg.block_n), cfg.num_warps, cfg.num_stages)
            for label, cache, nbytes, config in (("bf16", (kc16, vc16), 2 * elems, None),
                                                 ("fp8", (kc, vc), elems, None),
                                                 ("fp8 2x tile", (kc, vc), elems, big)):
                if config is big and budget == 66:
                    continue  # keep the script short: the larger tile at the full grid and 44 only
                def run():
                    return decode_attention.paged_decode_attention(
                        q, *cache, table, lens, scale, max_programs=budget, max_seq_len=max_len,
                        config=config)
                try:
                    err = rep.check(f"fp8 decode {label} {name} budget={budget}", run(), want, FP8_TOL)
                except OutOfResources as exc:
                    print(f"{'  skipped':<26} {label} grid={budget} {config}: {exc}")
                    if config is None:  # the default config must compile
                        rep.failures.append(f"fp8 decode {label} {name} budget={budget}: {exc}")
                    continue
                c = config or cfg
                rep.row(f"split-KV {label}", f"{name} grid={'full' if budget is None else budget}",
                        bench(run), nbytes, err, f"bn={c.block_n} w={c.num_warps} st={c.num_stages}")
        for programs in (66, 44):
            dflt = dap.default_config(D, 2)
            for label, cache, nbytes, config in (
                    ("bf16", (kc16, vc16), 2 * elems, None),
                    ("fp8", (kc, vc), elems, None),
                    ("fp8 tile 256", (kc, vc), elems, dataclasses.replace(dflt, tile_n=256)),
                    ("fp8", (kc, vc), elems, dap.CONFIGS[-1])):  # "hm"
                if config is dap.CONFIGS[-1] and programs != 44:
                    continue  # keep the script short
                def run():
                    return dap.paged_decode_attention(q, *cache, table, lens, scale, num_programs=programs,
                                                      config=config)
                c = config or dflt
                try:
                    err = rep.check(f"fp8 persistent {label} {c.describe()} {name} P={programs}", run(),
                                    want, FP8_TOL)
                except OutOfResources as exc:
                    print(f"{'  skipped':<26} {label} P={programs} {c.describe()}: {exc}")
                    if config is None:  # the default config must compile
                        rep.failures.append(f"fp8 persistent {label} {name} P={programs}: {exc}")
                    continue
                rep.row(f"persistent {label}", f"{name} P={programs}", bench(run), nbytes, err, c.describe())
        del kc, vc, kc16, vc16


def fp8_prefill(rep: Report, cases):
    header("FP8 KV cache: paged prefill attention (GB/s column = K+V bytes at 1 B / element)")
    for chunks in cases:
        lens = torch.tensor([c + n for c, n in chunks], device=DEV, dtype=torch.int32)
        qsl = torch.tensor([0] + [n for _, n in chunks], device=DEV).cumsum(0).to(torch.int32)
        kc16, vc16, table = make_cache(lens)
        kc, vc = kc16.to(FP8), vc16.to(FP8)
        q = rand(int(qsl[-1]), HQ, D)
        scale = D ** -0.5
        got = prefill_attention.paged_prefill_attention(q, kc, vc, table, qsl, lens, scale)
        want = _reference_on_fp8(reference.paged_prefill_attention, q, kc, vc, table, qsl, lens, scale)
        err = rep.check(f"fp8 prefill {chunks}", got, want, FP8_TOL)
        ms = bench(lambda: prefill_attention.paged_prefill_attention(q, kc, vc, table, qsl, lens, scale))
        rep.row("paged_prefill_attention fp8", " ".join(f"{c}+{n}" for c, n in chunks), ms,
                int(lens.sum()) * HK * D * 2, err)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the decode launch-config sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    sm_count = num_sms(DEV)
    print(f"device: {torch.cuda.get_device_name()} ({sm_count} SMs)  torch {torch.__version__}  "
          f"triton {triton.__version__}")
    rep = Report()

    big = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV)
    ms = bench(lambda: big.clone())
    print(f"baseline: torch clone of 1 GiB: {ms:.3f} ms, "
          f"{2 * big.numel() / ms / 1e6:.0f} GB/s (read + write)")
    del big

    bench_elementwise(rep, tokens=8192)
    budgets = [None, 66, 44, 32]
    bench_decode(rep, [(256, 1024, False), (256, 2048, False), (64, 4096, False), (512, 512, True),
                       (16, 8192, False), (1024, 1024, True)], budgets, sm_count)
    configs = [DecodeConfig(64, 4, 3), DecodeConfig(64, 4, 4), DecodeConfig(128, 4, 3),
               DecodeConfig(128, 8, 3), DecodeConfig(128, 8, 4), DecodeConfig(256, 8, 2)]
    if not args.quick:
        sweep_decode(rep, 256, 1024, [None, 44], configs)
    bench_prefill(rep, [[(0, 2048)], [(3072, 512)] * 4, [(0, 512), (1024, 512), (3000, 300), (100, 1)]])
    fp8_rope(rep, tokens=8192)
    fp8_decode(rep, [(256, 1024, False), (512, 1100, True)], sm_count)
    fp8_prefill(rep, [[(3072, 512)] * 4, [(0, 512), (1024, 512), (3000, 300), (100, 1)]])

    if rep.failures:
        print("\nFAILED checks:\n  " + "\n  ".join(rep.failures))
        sys.exit(1)
    print(f"\nall checks passed (rel err < {TOL:g}; fp8 caches < {FP8_TOL:g})")


if __name__ == "__main__":
    main()
