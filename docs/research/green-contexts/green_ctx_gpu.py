"""Decode attention and GEMMs on SM partitions made by CUDA green contexts (Llama-3-8B shapes).

    python docs/research/green-contexts/green_ctx_gpu.py          # ~2 min on an H200; JSON to $OUT/green_ctx.json

For each split A (the attention group) / 132 - A (the rest), with fresh random bf16 data:
  alone   the split-KV decode kernel (full-occupancy grid) on the A group, the GEMM chain
          (qkv, o, gate_up, down at M tokens, cuBLAS) on the rest; both also on the whole device.
  pair    both at once: attention on the A group + GEMMs on the rest ("split"), or + GEMMs on an
          ordinary whole-device stream ("attn-green"); `vs_seq` = (attention + GEMMs, each on the
          whole device, one after the other) / together. vs_seq > 1: the overlap pays.
  check   attention on a partition gives the same output as on the whole device (bitwise).
CUDA events, median of --reps after warm-up; a GPU sleep first so the host enqueues everything.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts of this study

from nanoflow.kernels import decode_attention as split_kv  # noqa: E402
from nanoflow.pipeline import sm_partition  # noqa: E402

HQ, HK, D, BLOCK = 32, 8, 128, 16
HIDDEN, INTER, QKV = 4096, 14336, 6144
DT = torch.bfloat16
DEV = torch.device("cuda")
SLEEP = 2_000_000


def rand(*shape):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(DT)


def decode_inputs(r: int, lo: int, hi: int):
    lens = torch.randint(lo, hi + 1, (r,), device=DEV, dtype=torch.int32)
    blocks = (lens + BLOCK - 1) // BLOCK
    max_blocks, num_blocks = int(blocks.max()), int(blocks.sum())
    table = torch.zeros(r, max_blocks, dtype=torch.int32, device=DEV)
    table[torch.arange(max_blocks, device=DEV)[None, :] < blocks[:, None]] = torch.randperm(
        num_blocks, device=DEV, dtype=torch.int32)
    kc, vc = rand(num_blocks, BLOCK, HK, D), rand(num_blocks, BLOCK, HK, D)
    return rand(r, HQ, D), kc, vc, table, lens, int(lens.sum()) * HK * D * 4


def timed(launches, reps):
    """launches: [(stream, fn)], launched in order after a shared gate. Returns median ms of
    (gate -> last end) and of each launch's own span."""
    main = torch.cuda.current_stream()
    spans, own = [], [[] for _ in launches]
    for rep in range(reps + 3):
        torch.cuda._sleep(SLEEP)
        gate = torch.cuda.Event(enable_timing=True)
        gate.record(main)
        marks = []
        for stream, fn in launches:
            stream.wait_event(gate)
            with torch.cuda.stream(stream):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
            marks.append((a, b))
        for stream, _ in launches:
            main.wait_stream(stream)
        torch.cuda.synchronize()
        if rep >= 3:
            first = min((a for a, _ in marks), key=lambda e: gate.elapsed_time(e))
            spans.append(max(first.elapsed_time(b) for _, b in marks))
            for i, (a, b) in enumerate(marks):
                own[i].append(a.elapsed_time(b))
    return statistics.median(spans), [statistics.median(o) for o in own]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--splits", default="24,32,40,48,56,64,72")
    ap.add_argument("--requests", type=int, default=286, help="decode requests (one nano-batch)")
    ap.add_argument("--tokens", default="286,1024", help="GEMM M values")
    args = ap.parse_args()
    rows = []
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    q, kc, vc, table, lens, kv_bytes = decode_inputs(args.requests, 1024, 1400)
    scale = D ** -0.5
    attn = lambda: split_kv.paged_decode_attention(q, kc, vc, table, lens, scale, max_seq_len=1400)  # noqa: E731
    want = attn().clone()
    whole = torch.cuda.Stream()
    weights = {"qkv": rand(QKV, HIDDEN), "o": rand(HIDDEN, HIDDEN), "gate_up": rand(2 * INTER, HIDDEN),
               "down": rand(HIDDEN, INTER)}
    gemm_sets = {}
    for m in [int(x) for x in args.tokens.split(",")]:
        x, h = rand(m, HIDDEN), rand(m, INTER)
        def chain(x=x, h=h):
            torch.mm(x, weights["qkv"].t())
            torch.mm(x, weights["o"].t())
            torch.mm(x, weights["gate_up"].t())
            torch.mm(h, weights["down"].t())
        flops = 2 * m * HIDDEN * (QKV + HIDDEN + 2 * INTER + INTER)
        gemm_sets[m] = (chain, flops)
    t_attn, _ = timed([(whole, attn)], args.reps)
    print(f"attention whole device: {t_attn:.3f} ms, {kv_bytes / t_attn / 1e6:.0f} GB/s "
          f"(R={args.requests}, {kv_bytes / 1e9:.2f} GB)")
    rows.append(dict(kind="attn", sms=props.multi_processor_count, ms=t_attn, gbs=kv_bytes / t_attn / 1e6))
    t_gemm = {}
    for m, (chain, flops) in gemm_sets.items():
        t_gemm[m], _ = timed([(whole, chain)], args.reps)
        print(f"GEMM chain M={m} whole device: {t_gemm[m]:.3f} ms, {flops / t_gemm[m] / 1e9:.0f} TFLOP/s")
        rows.append(dict(kind="gemm", m=m, sms=props.multi_processor_count, ms=t_gemm[m]))
    print(f"\n{'A':>4} {'rest':>4} {'attn ms':>8} {'GB/s':>6} {'same':>5} | per M: gemm-rest ms, TFLOP/s, "
          f"split ms (attn/gemm own), vs_seq, attn-green ms, vs_seq")
    for a in [int(x) for x in args.splits.split(",")]:
        try:
            part = sm_partition.split_sms(DEV, a, priorities=(-1, 0))
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"{a:>4} split failed: {type(exc).__name__}: {exc}")
            rows.append(dict(kind="split", a=a, error=str(exc)))
            continue
        ga, gr = part.sm_counts
        sa, sr = part.streams
        try:
            with torch.cuda.stream(sa):
                got = attn()
            torch.cuda.synchronize()
            same = bool(torch.equal(got, want))
            ta, _ = timed([(sa, attn)], args.reps)
        except Exception as exc:  # noqa: BLE001
            print(f"{ga:>4} attention on green stream failed: {type(exc).__name__}: {exc}")
            rows.append(dict(kind="split", a=ga, error=str(exc)))
            continue
        line = f"{ga:>4} {gr:>4} {ta:8.3f} {kv_bytes / ta / 1e6:6.0f} {str(same):>5} |"
        row = dict(kind="split", a=ga, rest=gr, attn_ms=ta, attn_gbs=kv_bytes / ta / 1e6, same=same, per_m={})
        for m, (chain, flops) in gemm_sets.items():
            tg, _ = timed([(sr, chain)], args.reps)
            tsplit, own = timed([(sa, attn), (sr, chain)], args.reps)
            tgreen, own2 = timed([(sa, attn), (whole, chain)], args.reps)
            seq = t_attn + t_gemm[m]
            line += (f" M={m}: {tg:.2f} {flops / tg / 1e9:.0f} {tsplit:.2f} ({own[0]:.2f}/{own[1]:.2f}) "
                     f"{seq / tsplit:.2f}x, {tgreen:.2f} {seq / tgreen:.2f}x |")
            row["per_m"][m] = dict(gemm_rest_ms=tg, split_ms=tsplit, split_own=own, vs_seq_split=seq / tsplit,
                                   green_ms=tgreen, green_own=own2, vs_seq_green=seq / tgreen)
        print(line, flush=True)
        rows.append(row)
    out = Path(os.environ.get("OUT", ".")) / "green_ctx.json"
    out.write_text(json.dumps(dict(device=props.name, torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
