"""The Hopper decode kernel (Gluon, TMA + wgmma, stream-K) against the split-KV Triton kernel, on the whole
device and on green-context SM partitions, bf16 and fp8 KV, Llama-3-8B shapes (32 / 8 heads, D=128).

    python benchmarks/decode_hopper_gpu.py --section check    # correctness, small and real shapes
    python benchmarks/decode_hopper_gpu.py --section perf     # timings; JSON to $OUT/decode_hopper.json

check: the new kernel against the torch reference (bf16: ||out - ref|| / ||ref|| < 1e-2; fp8 KV against
  the reference run on the dequantised cache, with bf16 q: bound FP8_TOL, the error of quantising q
  to e4m3 per row), over head dims, GQA groups, block sizes, ragged and empty contexts and small
  grids (many items cut between programs); and against the split-KV kernel at the benchmark shape.
perf: GB/s = K+V bytes read (sum of seq_lens x Hk x D x 2 x element size) / median ms (CUDA events,
  a GPU sleep first so the host enqueues ahead); tokens/s = attended (request, KV-head, token) rows
  per second. The device copy bandwidth (torch copy_, read + write) is measured on the same streams.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow.kernels import decode_attention as split_kv  # noqa: E402
from nanoflow.kernels import decode_attention_hopper as hopper  # noqa: E402
from nanoflow.kernels import reference  # noqa: E402
from nanoflow.pipeline import sm_partition  # noqa: E402

DEV = torch.device("cuda")
FP8 = torch.float8_e4m3fn
BF16_TOL = 1e-2
FP8_TOL = 4e-2
SLEEP = 1_000_000


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def make_inputs(lens: list[int], hk: int, group: int, d: int, bs: int, gen: torch.Generator, dtype=torch.bfloat16):
    """Random q / caches (bf16) with each request's pages at shuffled indices; table padding = -1."""
    nblk = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(nblk) + 2
    mb = max(1, max(nblk))
    table = torch.full((len(lens), mb), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)[:sum(nblk)].to(torch.int32)
    used = torch.arange(mb)[None, :] < torch.tensor(nblk)[:, None]
    table[used] = perm
    dgen = torch.Generator(device=DEV).manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
    kc = torch.randn(num_blocks, bs, hk, d, generator=dgen, device=DEV, dtype=dtype)
    vc = torch.randn(num_blocks, bs, hk, d, generator=dgen, device=DEV, dtype=dtype)
    q = torch.randn(len(lens), hk * group, d, generator=dgen, device=DEV, dtype=dtype)
    return q, kc, vc, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


def to_fp8(cache: torch.Tensor, scale: float) -> torch.Tensor:
    return (cache.float() / scale).clamp(-448, 448).to(FP8)


class Checker:
    def __init__(self):
        self.failures, self.rows = [], []

    def check(self, name: str, err: float, tol: float):
        ok = err < tol and err == err
        self.rows.append(dict(name=name, err=err, tol=tol, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (< {tol:.0e})", flush=True)
        if not ok:
            self.failures.append(name)


FP8_CHECK_CONFIGS = {"t64": hopper.HopperDecodeConfig(fp8_tile_tokens=64),
                     "t128": hopper.HopperDecodeConfig(fp8_tile_tokens=128, stages=2),
                     "pipe": hopper.HopperDecodeConfig(pipeline_pv=True)}
"""fp8 tile sizes checked (each case runs the fp8 kernel with both)."""


def parse_config(text: str) -> hopper.HopperDecodeConfig | None:
    """'default' (None: the kernel's own choice) or ctas_per_sm/stages/maxnreg[/fp8 tile tokens[/pipeline_pv]]."""
    return None if text == "default" else hopper.HopperDecodeConfig.parse(text)


def section_check(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    ck = Checker()
    ragged = [0, 1, 63, 64, 65, 130, 1000, 3001]
    cases = [  # (name, lens, Hk, G, D, bs, num_sms)
        ("llama D128 G4 bs16", ragged, 8, 4, 128, 16, None),
        ("llama D128 G4 bs16 3 SMs", ragged, 8, 4, 128, 16, 3),
        ("D128 G4 bs64", ragged, 8, 4, 128, 64, None),
        ("D64 G8 bs16", ragged, 4, 8, 64, 16, 7),
        ("D128 G1 bs32", ragged, 2, 1, 128, 32, 2),
        ("D128 G6 bs16", [5, 700, 2000], 2, 6, 128, 16, 4),
        ("one long request", [40000], 8, 4, 128, 16, None),
    ]
    for name, lens, hk, g, d, bs, sms in cases[:1] if args.quick else cases:
        try:
            q, kc, vc, table, sl = make_inputs(lens, hk, g, d, bs, gen)
            scale = d ** -0.5
            want = reference.paged_decode_attention(q.float(), kc.float(), vc.float(), table, sl, scale)
            got = hopper.paged_decode_attention(q, kc, vc, table, sl, scale, num_sms=sms,
                                                out=torch.full_like(q, float("nan")))
            torch.cuda.synchronize()
            ck.check(f"bf16 {name}", rel_err(got, want), BF16_TOL)
            ks, vs = 0.05, 0.03
            k8, v8 = to_fp8(kc, ks), to_fp8(vc, vs)
            want8 = reference.paged_decode_attention(q.float(), k8.float() * ks, v8.float() * vs, table, sl, scale)
            for tag, cfg in FP8_CHECK_CONFIGS.items():
                got8 = hopper.paged_decode_attention(q, k8, v8, table, sl, scale, num_sms=sms, k_scale=ks,
                                                     v_scale=vs, config=cfg, out=torch.full_like(q, float("nan")))
                torch.cuda.synchronize()
                ck.check(f"fp8 {tag} {name}", rel_err(got8, want8), FP8_TOL)
        except Exception:  # noqa: BLE001 - report every case
            traceback.print_exc()
            ck.failures.append(name)
    if args.quick:
        print(f"check: {len(ck.failures)} failures {ck.failures}")
        return dict(rows=ck.rows, failures=ck.failures)
    # real shape against the split-KV kernel (same cache), bf16 and fp8
    q, kc, vc, table, sl, _ = workload(args, gen, 256, 512, 2048)
    want = split_kv.paged_decode_attention(q, kc, vc, table, sl, 128 ** -0.5)
    got = hopper.paged_decode_attention(q, kc, vc, table, sl, 128 ** -0.5)
    ck.check("bf16 R=256 ctx 512-2048 vs split-KV", rel_err(got, want), BF16_TOL)
    k8, v8 = to_fp8(kc, 1.0), to_fp8(vc, 1.0)
    want8 = split_kv.paged_decode_attention(q, k8, v8, table, sl, 128 ** -0.5)
    for tag, cfg in [("default", None), *FP8_CHECK_CONFIGS.items()]:
        got8 = hopper.paged_decode_attention(q, k8, v8, table, sl, 128 ** -0.5, config=cfg)
        ck.check(f"fp8 {tag} R=256 ctx 512-2048 vs split-KV (fp8 cache, bf16 q)", rel_err(got8, want8), FP8_TOL)
    print(f"check: {len(ck.failures)} failures {ck.failures}")
    return dict(rows=ck.rows, failures=ck.failures)


def workload(args, gen, r: int, lo: int, hi: int, bs: int = 16):
    lens = torch.randint(lo, hi + 1, (r,), generator=gen).tolist()
    q, kc, vc, table, sl = make_inputs(lens, 8, 4, 128, bs, gen)
    return q, kc, vc, table, sl, sum(lens)


def timed(stream, fn, reps: int) -> float:
    times = []
    for i in range(reps + 2):
        with torch.cuda.stream(stream):
            torch.cuda._sleep(SLEEP)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def section_perf(args) -> dict:
    gen = torch.Generator().manual_seed(1)
    props = torch.cuda.get_device_properties(DEV)
    total_sms = props.multi_processor_count
    targets = [(total_sms, torch.cuda.Stream())]
    parts = []
    for a in [int(x) for x in args.splits.split(",") if x]:
        part = sm_partition.split_sms(DEV, a)
        parts.append(part)
        targets.append((part.sm_counts[0], part.streams[0]))
    rows = []
    big = torch.empty(2 << 30, dtype=torch.uint8, device=DEV)
    big2 = torch.empty_like(big)
    copy_bw = {}
    for sms, stream in targets:
        ms = timed(stream, lambda: big2.copy_(big), args.reps)
        copy_bw[sms] = 2 * big.numel() / ms / 1e6
        print(f"copy on {sms} SMs: {copy_bw[sms]:.0f} GB/s (read + write)", flush=True)
    del big, big2
    variants = [("split-KV (old)", None, None)] if args.split_kv else []
    for text in args.variants.split(","):
        variants.append((f"hopper {text}", "bf16", parse_config(text)))
    for text in args.fp8_variants.split(","):
        variants.append((f"hopper fp8 {text}", "fp8", parse_config(text)))
    if args.split_kv:
        variants.append(("split-KV (old) fp8", "old-fp8", None))
    for wl in args.workloads.split(","):
        r, lo, hi, bs = (int(x) for x in wl.split(":"))
        q, kc, vc, table, sl, ntok = workload(args, gen, r, lo, hi, bs)
        k8, v8 = to_fp8(kc, 1.0), to_fp8(vc, 1.0)
        rows_tok = ntok * 8
        print(f"\nworkload R={r} ctx {lo}-{hi} block {bs}: {rows_tok * 128 * 4 / 1e9:.2f} GB bf16 K+V")
        print(f"{'kernel':<28}" + "".join(f"{s:>9}" for s, _ in targets) + "   GB/s (Mtok/s) by SMs")
        for name, kind, cfg in variants:
            if kind is not None and kind.startswith("old") or kind is None:
                kk, vv = (k8, v8) if kind == "old-fp8" else (kc, vc)
                fn = lambda sms, kk=kk, vv=vv: split_kv.paged_decode_attention(  # noqa: E731
                    q, kk, vv, table, sl, 128 ** -0.5, max_seq_len=hi)
            else:
                kk, vv = (k8, v8) if kind == "fp8" else (kc, vc)
                fn = lambda sms, kk=kk, vv=vv, cfg=cfg: hopper.paged_decode_attention(  # noqa: E731
                    q, kk, vv, table, sl, 128 ** -0.5, num_sms=sms, config=cfg)
            elem = kk.element_size()
            line = f"{name:<28}"
            for sms, stream in targets:
                try:
                    ms = timed(stream, lambda: fn(sms), args.reps)
                    gbs = rows_tok * 128 * 2 * elem / ms / 1e6
                    mtok = rows_tok / ms / 1e3
                    line += f"{gbs:>6.0f}({mtok:>4.0f})"
                    rows.append(dict(workload=wl, kernel=name, sms=sms, ms=ms, gbs=gbs, mtok_s=mtok,
                                     copy_gbs=copy_bw[sms], frac_copy=gbs / copy_bw[sms]))
                except Exception as exc:  # noqa: BLE001
                    line += f"  ERR {type(exc).__name__}"
                    rows.append(dict(workload=wl, kernel=name, sms=sms, error=repr(exc)[:300]))
            print(line, flush=True)
        base = next((n for n, k, _ in variants if k == "bf16"), None)
        mt = {(x["kernel"], x["sms"]): x["mtok_s"] for x in rows if x["workload"] == wl and "mtok_s" in x}
        print(f"tokens/s relative to {base}:")
        for name, kind, _ in variants:
            if kind == "fp8" and base is not None:
                print(f"  {name:<26}" + "".join(f"{mt.get((name, s), 0) / mt.get((base, s), 1e30):>8.2f}x"
                                               for s, _ in targets), flush=True)
        del q, kc, vc, k8, v8
        torch.cuda.empty_cache()
    return dict(copy_gbs=copy_bw, rows=rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--section", choices=["check", "perf"], required=True)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="check: the first case only (a smoke test)")
    ap.add_argument("--splits", default="64,48,40")
    ap.add_argument("--workloads", default="512:512:2048:16,512:512:2048:64,256:2048:4096:16")
    ap.add_argument("--variants", default="2/3/128,1/6/255,default",
                    help="bf16: 'default' or ctas_per_sm/stages/maxnreg (the first is the fp8 ratios' base)")
    ap.add_argument("--fp8-variants", default="2/4/128,default,3/3/80,3/2/80,2/2/128/128,4/2/64/128",
                    help="fp8: 'default' or ctas_per_sm/stages/maxnreg[/tile tokens 64|128[/pipeline_pv 0|1]]")
    ap.add_argument("--split-kv", type=int, default=1, help="1: time the split-KV kernel too (the old path)")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(DEV)
    import triton
    print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton "
          f"{triton.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; hopper kernel available: "
          f"{hopper.available(DEV)}", flush=True)
    result = dict(device=props.name, date=time.strftime("%Y-%m-%d"), args=vars(args))
    result.update(section_check(args) if args.section == "check" else section_perf(args))
    tag = "smoke" if args.quick else args.section
    out = Path(os.environ.get("OUT", ".")) / f"decode_hopper_{tag}.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
