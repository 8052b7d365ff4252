"""SM-budgeted kernels and their overlap on one GPU (Llama-3-8B shapes), for NanoFlow's stage 2.

    python docs/research/overlap-budgeted-kernels/overlap_gpu.py            # ~2-3 min on an H200; JSON to $OUT/overlap.json

Sections (every timing: CUDA events, median of --reps after warm-up, fresh random bf16 data):
  A  decode attention alone, R=512 requests, contexts uniform in [1024, 1280], Hq 32 / Hk 8, D 128,
     block 16: the split-KV kernel (full grid; max_programs 66/44/32) and the persistent stream-K
     kernel (decode_attention_persistent) at num_programs 16..132 for each of its CONFIGS. GB/s = K+V
     bytes / time. "stream" rows: a plain read of the same bytes on B programs (64x512 tiles, 16
     warps, 4 stages) = the bandwidth a B-program kernel can reach at all.
  B  GEMMs alone, M=1024 tokens: gate_up (4096->28672), down (14336->4096), qkv (4096->6144):
     cuBLAS (torch.mm) and persistent_matmul at budgets 132..66 for each GemmConfig.
  C  concurrency: decode (persistent, best 2 configs at budget B) on a high-priority stream plus the
     GEMM chain gate_up -> down on a normal stream, with cuBLAS or with persistent_matmul on 132-B
     programs. Both streams wait on one event (a GPU sleep first lets the host enqueue everything);
     the first-launched stream starts at once, the second ~5 us later. Reported: together (first
     start -> last end), each kernel's own time in the pair vs alone (slowdown), speedup = (decode
     alone + GEMMs alone) / together, and vs_seq = (full-grid split-KV decode + cuBLAS GEMMs, the
     fastest sequential pair) / together: vs_seq > 1 means the overlap beats running them in turn.
  D  correctness: every variant's output vs the torch reference, relative error < 1e-2 ("err").

Each variant is guarded: a failure (e.g. shared-memory overflow of a config) prints one line and
the run goes on. Exit status 1 if any correctness check failed.
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
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

from nanoflow.kernels import decode_attention as split_kv  # noqa: E402
from nanoflow.kernels import decode_attention_persistent as dap  # noqa: E402
from nanoflow.kernels import gemm_persistent as gp  # noqa: E402
from nanoflow.kernels import reference  # noqa: E402

R, CTX_LO, CTX_HI, HQ, HK, D, BLOCK = 512, 1024, 1280, 32, 8, 128, 16
M, HIDDEN, INTER, QKV = 1024, 4096, 14336, 6144
DECODE_BUDGETS = (16, 24, 32, 44, 66, 132)
GEMM_BUDGETS = (132, 110, 108, 100, 88, 66)
PAIR_BUDGETS = (24, 32, 44, 66)
REVERSE_BUDGET = 32             # the pair also measured with the GEMMs launched first
DT = torch.bfloat16
DEV = torch.device("cuda")
TOL = 1e-2
GATE_SLEEP_CYCLES = 2_000_000   # ~1 ms: the host enqueues both streams before they start
STAGGER_CYCLES = 10_000         # ~5 us: the second-launched stream starts after the first


class Run:
    """Collects rows (printed at once, kept for the JSON) and failed checks."""

    def __init__(self, deadline_s: float):
        self.t0 = time.time()
        self.deadline_s = deadline_s
        self.rows: list[dict] = []
        self.failures: list[str] = []

    def out_of_time(self, section: str) -> bool:
        if time.time() - self.t0 > self.deadline_s:
            print(f"  [{section}: skipped, {time.time() - self.t0:.0f} s > {self.deadline_s:.0f} s budget]")
            return True
        return False

    def check(self, name: str, got: torch.Tensor, want: torch.Tensor) -> float:
        err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
        if not err < TOL:  # also NaN
            self.failures.append(f"{name}: rel err {err:.2e}")
        return err

    def add(self, section: str, name: str, text: str, **fields):
        print(f"  {name:<44} {text}", flush=True)
        self.rows.append(dict(section=section, name=name, **fields))

    def fail(self, section: str, name: str, exc: BaseException):
        line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"  {name:<44} FAILED {type(exc).__name__}: {line[:160]}", flush=True)
        self.rows.append(dict(section=section, name=name, error=f"{type(exc).__name__}: {line}"))


def rand(*shape, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(DT)


def time_alone(fn, reps: int, stream: torch.cuda.Stream | None = None) -> float:
    """Median ms of fn on `stream`, each rep started after a GPU sleep (same protocol as pairs)."""
    return statistics.median(time_pair([(stream or torch.cuda.current_stream(), fn)], reps)["first"])


def time_pair(launches, reps: int, warmup: int = 3) -> dict:
    """launches: [(stream, fn)] in launch order (1 or 2). Per rep: sleep on the current stream, record
    a gate event, every stream waits on it; stream i > 0 sleeps STAGGER_CYCLES before its kernels."""
    main = torch.cuda.current_stream()
    out = {"together": [], "first": [], "second": []}
    for rep in range(warmup + reps):
        torch.cuda._sleep(GATE_SLEEP_CYCLES)
        gate = torch.cuda.Event()
        gate.record(main)
        marks = []
        for i, (stream, fn) in enumerate(launches):
            stream.wait_event(gate)
            with torch.cuda.stream(stream):
                if i:
                    torch.cuda._sleep(STAGGER_CYCLES)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
            marks.append((start, end))
        for stream, _ in launches:
            main.wait_stream(stream)
        torch.cuda.synchronize()
        if rep < warmup:
            continue
        s0 = marks[0][0]
        out["first"].append(s0.elapsed_time(marks[0][1]))
        if len(marks) > 1:
            out["second"].append(marks[1][0].elapsed_time(marks[1][1]))
            out["together"].append(max(s0.elapsed_time(marks[0][1]), s0.elapsed_time(marks[1][1])))
    return out


# ---------------------------------------------------------------- A: decode attention alone

@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, num_tiles, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Bandwidth probe: program p sums contiguous [ROWS, COLS] tiles p, p + P, ... of x."""
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    acc = tl.zeros([ROWS, COLS], tl.float32)
    for t in range(tl.program_id(0).to(tl.int64), num_tiles, tl.num_programs(0)):  # int64 offsets
        acc += tl.load(x_ptr + t * (ROWS * COLS) + offs).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def make_decode_inputs():
    lens = torch.randint(CTX_LO, CTX_HI + 1, (R,), device=DEV, dtype=torch.int32)
    blocks = (lens + BLOCK - 1) // BLOCK
    max_blocks, num_blocks = int(blocks.max()), int(blocks.sum())
    table = torch.zeros(R, max_blocks, dtype=torch.int32, device=DEV)
    table[torch.arange(max_blocks, device=DEV)[None, :] < blocks[:, None]] = torch.randperm(
        num_blocks, device=DEV, dtype=torch.int32)  # each request's blocks scattered over the cache
    kc, vc = rand(num_blocks, BLOCK, HK, D), rand(num_blocks, BLOCK, HK, D)
    q = rand(R, HQ, D)
    kv_bytes = int(lens.sum()) * HK * D * 2 * 2
    return q, kc, vc, table, lens, kv_bytes


def section_a(run: Run, reps: int, dec) -> dict:
    q, kc, vc, table, lens, kv_bytes = dec["inputs"]
    scale = D ** -0.5
    want = dec["want"]
    print(f"\n== A  decode attention alone: R={R} ctx {CTX_LO}-{CTX_HI} Hq={HQ} Hk={HK} D={D} "
          f"block={BLOCK}, K+V {kv_bytes / 1e9:.2f} GB")
    print(f"  {'variant':<44} {'ms':>8} {'GB/s':>7} {'err':>8}")
    best: dict = {}  # budget -> [(ms, config)] of the persistent kernel, fastest first

    def row(name, fn, budget, kind, config=None):
        try:
            err = run.check(f"A {name}", fn(), want)
            ms = time_alone(fn, reps)
        except Exception as exc:  # noqa: BLE001 - report and go on
            run.fail("A", name, exc)
            return
        gbs = kv_bytes / ms / 1e6
        run.add("A", name, f"{ms:8.4f} {gbs:7.0f} {err:8.1e}", kind=kind, budget=budget, ms=ms, gbs=gbs,
                err=err, config=config.describe() if config else None)
        if kind == "persistent":
            best.setdefault(budget, []).append((ms, config))

    for budget in (None, 66, 44, 32):
        row(f"split-KV grid={'full' if budget is None else budget}",
            lambda b=budget: split_kv.paged_decode_attention(q, kc, vc, table, lens, scale, max_programs=b,
                                                             max_seq_len=CTX_HI),
            budget, "split_kv")
    for budget in DECODE_BUDGETS:
        for cfg in dap.CONFIGS:
            row(f"persistent P={budget} {cfg.describe()}",
                lambda b=budget, c=cfg: dap.paged_decode_attention(q, kc, vc, table, lens, scale,
                                                                   num_programs=b, config=c),
                budget, "persistent", cfg)
    # Bandwidth probe over the same number of bytes (K then V caches as one flat read each).
    sink = torch.empty(256, device=DEV, dtype=torch.float32)
    rows, cols = 64, 512
    tiles_k = kc.numel() // (rows * cols)
    for budget in DECODE_BUDGETS:
        def probe(b=budget):
            _stream_read_kernel[(b,)](kc, sink, tiles_k, ROWS=rows, COLS=cols, num_warps=16, num_stages=4)
            _stream_read_kernel[(b,)](vc, sink, tiles_k, ROWS=rows, COLS=cols, num_warps=16, num_stages=4)
            return sink
        try:
            ms = time_alone(probe, reps)
            gbs = 2 * tiles_k * rows * cols * 2 / ms / 1e6
            run.add("A", f"stream read P={budget}", f"{ms:8.4f} {gbs:7.0f}", kind="stream", budget=budget,
                    ms=ms, gbs=gbs)
        except Exception as exc:  # noqa: BLE001
            run.fail("A", f"stream read P={budget}", exc)
    for budget in best:
        best[budget].sort(key=lambda x: x[0])
    return best


# ---------------------------------------------------------------- B: GEMMs alone

def section_b(run: Run, reps: int, gemms: dict) -> dict:
    print(f"\n== B  GEMMs alone, M={M} (out = a @ w.T, bf16); '*' = choose_config's pick")
    print(f"  {'variant':<44} {'ms':>8} {'TFLOP/s':>7} {'err':>8}")
    best: dict = {}  # (shape, budget) -> (ms, config)
    for name, (a, w, want) in gemms.items():
        flops = 2 * a.shape[0] * a.shape[1] * w.shape[0]
        out = torch.empty(a.shape[0], w.shape[0], device=DEV, dtype=DT)
        try:
            err = run.check(f"B cublas {name}", torch.mm(a, w.T, out=out), want)
            ms = time_alone(lambda: torch.mm(a, w.T, out=out), reps)
            run.add("B", f"{name} cuBLAS", f"{ms:8.4f} {flops / ms / 1e9:7.0f} {err:8.1e}", shape=name,
                    kind="cublas", budget=None, ms=ms, tflops=flops / ms / 1e9, err=err)
            best[(name, "cublas")] = (ms, None)
        except Exception as exc:  # noqa: BLE001
            run.fail("B", f"{name} cuBLAS", exc)
        variants = [(b, c) for b in GEMM_BUDGETS for c in gp.CONFIGS]
        variants.append((132, gp.GemmConfig(128, 256, 64, num_warps=8, num_stages=3, tma=False)))
        for budget, cfg in variants:
            if run.out_of_time("B"):
                return best
            pick = "*" if cfg == gp.choose_config(a.shape[0], w.shape[0], a.shape[1], budget) else " "
            label = f"{name} P={budget} {cfg.describe()}{pick}"

            def fn(b=budget, c=cfg):
                return gp.persistent_matmul(a, w, num_programs=b, out=out, config=c)
            try:
                err = run.check(f"B {label}", fn(), want)
                ms = time_alone(fn, reps)
            except Exception as exc:  # noqa: BLE001
                run.fail("B", label, exc)
                continue
            run.add("B", label, f"{ms:8.4f} {flops / ms / 1e9:7.0f} {err:8.1e}", shape=name,
                    kind="persistent", budget=budget, config=cfg.describe(), ms=ms, tflops=flops / ms / 1e9,
                    err=err)
            if (name, budget) not in best or ms < best[(name, budget)][0]:
                best[(name, budget)] = (ms, cfg)
    return best


# ---------------------------------------------------------------- C: concurrency

def short(cfg: dap.PersistentDecodeConfig) -> str:
    return f"t{cfg.tile_n}h{cfg.heads_per_item or 'all'}w{cfg.num_warps}s{cfg.num_stages}"


def gemm_chain(gemms: dict, outs: dict, budget: int | None, best_gemm: dict):
    """gate_up then down (independent inputs, same stream): cuBLAS, or persistent on `budget`."""
    a1, w1, _ = gemms["gate_up"]
    a2, w2, _ = gemms["down"]
    if budget is None:
        def chain():
            torch.mm(a1, w1.T, out=outs["gate_up"])
            torch.mm(a2, w2.T, out=outs["down"])
        return chain
    cfg1 = best_gemm.get(("gate_up", budget), (None, None))[1]
    cfg2 = best_gemm.get(("down", budget), (None, None))[1]

    def chain():
        gp.persistent_matmul(a1, w1, num_programs=budget, out=outs["gate_up"], config=cfg1)
        gp.persistent_matmul(a2, w2, num_programs=budget, out=outs["down"], config=cfg2)
    return chain


def section_c(run: Run, reps: int, dec: dict, gemms: dict, best_dec: dict, best_gemm: dict,
              seq_ms: float | None):
    q, kc, vc, table, lens, _ = dec["inputs"]
    scale = D ** -0.5
    print("\n== C  decode (high-priority stream) + GEMM chain gate_up -> down (normal stream)")
    print(f"  fastest sequential pair (split-KV full grid + cuBLAS): "
          f"{'n/a' if seq_ms is None else f'{seq_ms:.4f} ms'}")
    print(f"  {'pair':<44} {'togeth':>7} {'dec ms':>7} {'slow':>5} {'gemm ms':>7} {'slow':>5} "
          f"{'speedup':>7} {'vs_seq':>6} {'err':>8}")
    hi = torch.cuda.Stream(priority=-1)
    lo = torch.cuda.Stream()
    outs = {name: torch.empty(a.shape[0], w.shape[0], device=DEV, dtype=DT)
            for name, (a, w, _) in gemms.items()}
    dec_out = torch.empty_like(q)
    chain_alone: dict = {}

    def chain_ms(budget):
        if budget not in chain_alone:
            chain_alone[budget] = time_alone(gemm_chain(gemms, outs, budget, best_gemm), reps, lo)
        return chain_alone[budget]

    cases = []
    for budget in PAIR_BUDGETS:
        for _, cfg in best_dec.get(budget, [])[:2]:
            for gemm_budget in (None, 132 - budget):
                cases.append((budget, cfg, gemm_budget, "decode_first"))
    if best_dec.get(REVERSE_BUDGET):
        cfg = best_dec[REVERSE_BUDGET][0][1]
        cases += [(REVERSE_BUDGET, cfg, None, "gemm_first"),
                  (REVERSE_BUDGET, cfg, 132 - REVERSE_BUDGET, "gemm_first")]
    for budget, cfg, gemm_budget, order in cases:
        if run.out_of_time("C"):
            return
        gname = "cuBLAS" if gemm_budget is None else f"pGEMM P={gemm_budget}"
        label = f"dec P={budget} {short(cfg)} + {gname}{' (GEMM 1st)' if order == 'gemm_first' else ''}"
        try:
            def decode(b=budget, c=cfg):
                dap.paged_decode_attention(q, kc, vc, table, lens, scale, num_programs=b, config=c,
                                           out=dec_out)
            chain = gemm_chain(gemms, outs, gemm_budget, best_gemm)
            d_alone = time_alone(decode, reps, hi)
            g_alone = chain_ms(gemm_budget)
            launches = [(hi, decode), (lo, chain)] if order == "decode_first" else [(lo, chain), (hi, decode)]
            res = time_pair(launches, reps)
            together = statistics.median(res["together"])
            d_pair = statistics.median(res["first" if order == "decode_first" else "second"])
            g_pair = statistics.median(res["second" if order == "decode_first" else "first"])
            err = max(run.check(f"C {label} decode", dec_out, dec["want"]),
                      run.check(f"C {label} down", outs["down"], gemms["down"][2]),
                      run.check(f"C {label} gate_up", outs["gate_up"], gemms["gate_up"][2]))
        except Exception as exc:  # noqa: BLE001
            run.fail("C", label, exc)
            continue
        speedup = (d_alone + g_alone) / together
        vs_seq = seq_ms / together if seq_ms else float("nan")
        run.add("C", label, f"{together:7.4f} {d_pair:7.4f} {d_pair / d_alone:5.2f} {g_pair:7.4f} "
                f"{g_pair / g_alone:5.2f} {speedup:7.3f} {vs_seq:6.3f} {err:8.1e}",
                budget=budget, config=cfg.describe(), gemm_budget=gemm_budget, order=order,
                together_ms=together, decode_ms=d_pair, decode_alone_ms=d_alone, gemm_ms=g_pair,
                gemm_alone_ms=g_alone, speedup=speedup, vs_seq=vs_seq, err=err)


# ---------------------------------------------------------------- main

def _best_gbs(rows, kind, budget) -> float:
    return max((r["gbs"] for r in rows if r["kind"] == kind and r["budget"] == budget), default=float("nan"))


def summary(run: Run):
    """One line per budget B: what decode reaches on B programs, and the best pair at B."""
    ok = [r for r in run.rows if "error" not in r]
    a_rows = [r for r in ok if r["section"] == "A"]
    print("\n== summary (GB/s: decode K+V read, split = split-KV max_programs=B (132: full grid);"
          "\n   pair: the decode_first case at B with the best vs_seq)")
    print(f"  {'B':>4} {'persist':>7} {'split':>6} {'stream':>6} {'gate_up@132-B':>13}  "
          f"{'pair ms':>7} {'vs_seq':>6} {'speedup':>7} {'dec/gemm slowdown':>17}  best decode config; pair")
    nan = float("nan")
    for budget in sorted(set(DECODE_BUDGETS) | set(PAIR_BUDGETS)):
        pers = [r for r in a_rows if r["kind"] == "persistent" and r["budget"] == budget]
        best = min(pers, key=lambda r: r["ms"]) if pers else None
        gemm = [r["tflops"] for r in ok if r["section"] == "B" and r.get("shape") == "gate_up"
                and r.get("budget") == 132 - budget]
        pairs = [r for r in ok if r["section"] == "C" and r["budget"] == budget
                 and r["order"] == "decode_first"]
        pair = max(pairs, key=lambda r: r["vs_seq"]) if pairs else None
        split = _best_gbs(a_rows, "split_kv", None if budget == 132 else budget)
        text = (f"  {budget:>4} {best['gbs'] if best else nan:7.0f} {split:6.0f} "
                f"{_best_gbs(a_rows, 'stream', budget):6.0f} {max(gemm, default=nan):13.0f}  ")
        if pair:
            dec_slow = pair["decode_ms"] / pair["decode_alone_ms"]
            gemm_slow = pair["gemm_ms"] / pair["gemm_alone_ms"]
            text += (f"{pair['together_ms']:7.4f} {pair['vs_seq']:6.3f} {pair['speedup']:7.3f} "
                     f"{dec_slow:8.2f} /{gemm_slow:6.2f}  ")
        else:
            text += " " * 42
        text += best["config"] if best else "-"
        if pair:
            gname = "cuBLAS" if pair["gemm_budget"] is None else f"pGEMM P={pair['gemm_budget']}"
            same = best and pair["config"] == best["config"]
            text += f"; pair: {'same' if same else pair['config']} + {gname}"
        print(text)
    for r in (r for r in ok if r["section"] == "C" and r["order"] == "gemm_first"):
        gname = "cuBLAS" if r["gemm_budget"] is None else f"pGEMM P={r['gemm_budget']}"
        print(f"  GEMMs launched first, B={r['budget']} ({gname}): vs_seq {r['vs_seq']:.3f}, "
              f"speedup {r['speedup']:.3f}")
    print("  read: vs_seq > 1 = overlap beats the fastest sequential pair; pick the B (and GEMM kind) with\n"
          "  the largest vs_seq, and for decode alone the config with the most GB/s at that B.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--deadline", type=float, default=210.0,
                        help="seconds after which remaining variants are skipped")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    run = Run(args.deadline)
    props = torch.cuda.get_device_properties(DEV)
    print(f"device: {props.name} ({props.multi_processor_count} SMs)  torch {torch.__version__}  "
          f"triton {triton.__version__}  reps {args.reps} (median)")

    q, kc, vc, table, lens, kv_bytes = inputs = make_decode_inputs()
    dec = dict(inputs=inputs, want=reference.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5))
    best_dec = {}
    try:
        best_dec = section_a(run, args.reps, dec)
    except Exception:  # noqa: BLE001
        traceback.print_exc()

    gemms = {}
    shapes = {"gate_up": (HIDDEN, 2 * INTER), "down": (INTER, HIDDEN), "qkv": (HIDDEN, QKV)}
    for name, (k, n) in shapes.items():
        a, w = rand(M, k), rand(n, k, scale=k ** -0.5)
        gemms[name] = (a, w, (a.float() @ w.float().T).to(DT))
    best_gemm = {}
    try:
        best_gemm = section_b(run, args.reps, gemms)
    except Exception:  # noqa: BLE001
        traceback.print_exc()

    split_full = [r for r in run.rows
                  if r.get("kind") == "split_kv" and r.get("budget") is None and "ms" in r]
    cublas = [best_gemm.get((s, "cublas"), (None,))[0] for s in ("gate_up", "down")]
    seq_ms = split_full[0]["ms"] + sum(cublas) if split_full and None not in cublas else None
    try:
        section_c(run, args.reps, dec, gemms, best_dec, best_gemm, seq_ms)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    summary(run)

    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "overlap.json"
        path.write_text(json.dumps(dict(device=props.name, sms=props.multi_processor_count,
                                        torch=torch.__version__, triton=triton.__version__,
                                        seq_ms=seq_ms, rows=run.rows, failures=run.failures), indent=1))
        print(f"\nwrote {path}")
    print(f"\nelapsed {time.time() - run.t0:.0f} s")
    if run.failures:
        print("FAILED checks:\n  " + "\n  ".join(run.failures))
        sys.exit(1)
    print(f"all checks passed (rel err < {TOL})")


if __name__ == "__main__":
    main()
