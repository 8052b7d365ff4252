"""Checks every Triton kernel against its torch reference on Llama-3-8B shapes (bf16) and times it.

    python benchmarks/kernels_gpu.py            # ~1-2 min on an H200 (most of it Triton compiles)
    python benchmarks/kernels_gpu.py --quick    # skip the decode launch-config sweep

Correctness: relative error ||out - ref|| / ||ref|| < 1e-2 on fresh random data (never zeros), for
every kernel and every decode-attention configuration that is timed. Timing: triton.testing.do_bench,
median. GB/s = bytes the kernel must move / time (decode attention: K and V bytes read). Exits 1 if
any check fails.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow.kernels import reference, triton_ops  # noqa: E402
from nanoflow.kernels.decode_attention import (  # noqa: E402
    DecodeConfig, choose_num_splits, default_config, num_sms)

HIDDEN, INTER, HQ, HK, D, BLOCK = 4096, 14336, 32, 8, 128, 16
DT = torch.bfloat16
DEV = torch.device("cuda")
TOL = 1e-2


class Report:
    def __init__(self):
        self.failures: list[str] = []

    def check(self, name: str, got: torch.Tensor, want: torch.Tensor) -> float:
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
        if not err < TOL:  # also catches NaN
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

    if rep.failures:
        print("\nFAILED checks:\n  " + "\n  ".join(rep.failures))
        sys.exit(1)
    print("\nall checks passed (rel err < 1e-2)")


if __name__ == "__main__":
    main()
