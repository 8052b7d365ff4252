"""Decode attention configurations on an SM partition (CUDA green context), Llama-3-8B shapes.

    python docs/research/green-contexts/decode_partition_sweep_gpu.py [--splits 48,64]   # JSON to $OUT/decode_partition.json

On the A-SM group of a green-context split, with the kernel free to launch as many CTAs as fit
(several per SM): the split-KV kernel over tile / warps / stages, the persistent stream-K kernel over
its configs x programs (k x A), and a plain streaming read of the same bytes (the partition's
bandwidth ceiling). GB/s = K+V bytes / median ms; each output checked against the whole-device
split-KV result (max abs diff).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts of this study

from green_ctx_gpu import D, decode_inputs, timed  # noqa: E402
from nanoflow.kernels import decode_attention as split_kv  # noqa: E402
from nanoflow.kernels import decode_attention_persistent as dap  # noqa: E402
from nanoflow.pipeline import sm_partition  # noqa: E402

DEV = torch.device("cuda")


@triton.jit
def _read_kernel(x_ptr, out_ptr, num_tiles, ROWS: tl.constexpr, COLS: tl.constexpr):
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    acc = tl.zeros([ROWS, COLS], tl.float32)
    for t in range(tl.program_id(0).to(tl.int64), num_tiles, tl.num_programs(0)):
        acc += tl.load(x_ptr + t * (ROWS * COLS) + offs).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def splitkv_table(args, inputs, kv_bytes: int, want: torch.Tensor) -> None:
    """The --splitkv configs on the whole device and on each split's A-SM group: one line each."""
    q, kc, vc, table, lens = inputs
    configs = []
    for text in args.splitkv.split(","):
        bn, w, st, regs = (int(x) for x in text.split("/"))
        configs.append(split_kv.DecodeConfig(block_n=bn, num_warps=w, num_stages=st, max_registers=regs or None))
    parts = [sm_partition.split_sms(DEV, int(x)) for x in args.splits.split(",")]
    targets = [(torch.cuda.get_device_properties(DEV).multi_processor_count, torch.cuda.Stream())]
    targets += [(p.sm_counts[0], p.streams[0]) for p in parts]
    print(f"{'config':<28}" + "".join(f"{sms:>8}" for sms, _ in targets) + "   (GB/s by SMs)")
    rows = []
    for cfg in configs:
        fn = lambda c=cfg: split_kv.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5,  # noqa: E731
                                                           max_seq_len=1400, config=c)
        line = f"bn={cfg.block_n} w={cfg.num_warps} st={cfg.num_stages} regs={cfg.max_registers}"
        cells = []
        for sms, stream in targets:
            try:
                with torch.cuda.stream(stream):
                    err = (fn().float() - want.float()).abs().max().item()
                ms, _ = timed([(stream, fn)], args.reps)
                cells.append(kv_bytes / ms / 1e6)
                rows.append(dict(config=line, sms=sms, gbs=cells[-1], err=err))
            except Exception as exc:  # noqa: BLE001 - report and go on
                cells.append(float("nan"))
                print(f"  {line} failed: {str(exc).strip().splitlines()[-1][:100]}")
        print(f"{line:<28}" + "".join(f"{c:8.0f}" for c in cells), flush=True)
    Path(os.environ.get("OUT", "."), "decode_partition_splitkv.json").write_text(json.dumps(rows, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", default="48,64")
    ap.add_argument("--requests", type=int, default=286)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--splitkv", default=None,
                    help="only these split-KV configs, BLOCK_N/WARPS/STAGES/MAXNREG (0 = no cap), comma "
                         "separated, also timed on the whole device; skips the other sections")
    args = ap.parse_args()
    q, kc, vc, table, lens, kv_bytes = decode_inputs(args.requests, 1024, 1400)
    scale = D ** -0.5
    want = split_kv.paged_decode_attention(q, kc, vc, table, lens, scale, max_seq_len=1400).clone()
    rows = []
    sink = torch.empty(4096, device=DEV, dtype=torch.float32)
    if args.splitkv:
        splitkv_table(args, (q, kc, vc, table, lens), kv_bytes, want)
        return
    for a in [int(x) for x in args.splits.split(",")]:
        part = sm_partition.split_sms(DEV, a, priorities=(-1, 0))
        sa = part.streams[0]
        a = part.sm_counts[0]
        print(f"\n== partition {a} SMs (rest {part.sm_counts[1]}), R={args.requests}, {kv_bytes / 1e9:.2f} GB")
        results = []

        def measure(name, fn, check=True):
            try:
                with torch.cuda.stream(sa):
                    got = fn()
                torch.cuda.synchronize()
                err = (got.float() - want.float()).abs().max().item() if check else 0.0
                ms, _ = timed([(sa, fn)], args.reps)
            except Exception as exc:  # noqa: BLE001 - e.g. shared memory overflow: report, go on
                msg = str(exc).strip().splitlines()[-1][:100] if str(exc).strip() else type(exc).__name__
                print(f"  {name:<48} FAILED {msg}", flush=True)
                return
            gbs = kv_bytes / ms / 1e6
            results.append((gbs, name))
            rows.append(dict(a=a, name=name, ms=ms, gbs=gbs, err=err))
            print(f"  {name:<48} {ms:7.3f} ms {gbs:6.0f} GB/s  err {err:.1e}", flush=True)

        for bn, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3, 4, 5)):
            if 2 * bn * D * 2 * (st - 1) > 200_000:
                continue
            cfg = split_kv.DecodeConfig(block_n=bn, num_warps=w, num_stages=st)
            measure(f"splitkv bn={bn} w={w} st={st}",
                    lambda c=cfg: split_kv.paged_decode_attention(q, kc, vc, table, lens, scale,
                                                                  max_seq_len=1400, config=c))
        persistent = [(128, 1, 4, 3), (64, 1, 4, 3), (64, 1, 4, 2), (64, 2, 4, 2), (32, 1, 4, 4),
                      (32, 2, 4, 3), (32, 1, 4, 3), (64, 1, 8, 3)]
        for (tile, hb, w, st), k in itertools.product(persistent, (1, 2, 3, 4)):
            cfg = dap.PersistentDecodeConfig(tile_n=tile, heads_per_item=hb, num_warps=w, num_stages=st)
            measure(f"tm tile={tile} hb={hb} w={w} st={st} P={k}x",
                    lambda c=cfg, p=k * a: dap.paged_decode_attention(q, kc, vc, table, lens, scale,
                                                                      num_programs=p, config=c))
        for (r, c, w, st), k in itertools.product([(64, 512, 16, 4), (32, 256, 4, 4), (16, 512, 4, 6)],
                                                  (1, 2, 4, 8)):
            tiles = kc.numel() // (r * c)

            def probe(r=r, c=c, w=w, st=st, p=k * a, tiles=tiles):
                _read_kernel[(p,)](kc, sink, tiles, ROWS=r, COLS=c, num_warps=w, num_stages=st)
                _read_kernel[(p,)](vc, sink, tiles, ROWS=r, COLS=c, num_warps=w, num_stages=st)
                return sink
            measure(f"read {r}x{c} w={w} st={st} P={k}x", probe, check=False)
        results.sort(reverse=True)
        print(f"  best on {a} SMs: " + "; ".join(f"{n} {g:.0f}" for g, n in results[:6]))
    out = Path(os.environ.get("OUT", ".")) / "decode_partition.json"
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
