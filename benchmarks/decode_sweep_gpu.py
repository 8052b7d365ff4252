"""Sweep of the persistent decode-attention kernel's variants / configs on few SMs (one GPU).

    python benchmarks/decode_sweep_gpu.py          # < 3 min on an H200; JSON to $OUT/decode_sweep.json

Question: which PersistentDecodeConfig keeps the most HBM bandwidth at num_programs = 32 / 44 / 66 /
132 (decode on a third of the SMs beside GEMMs), and how close is it to a plain read?
Cases (bf16, Hq 32 / Hk 8, D 128, block 16, blocks of a request scattered over the cache):
  R512   512 requests, contexts uniform in [1024, 1280]  (the overlap_gpu.py case, K+V 2.41 GB)
  R128   128 requests, context 4096                        (few long requests, K+V 2.15 GB)
Rows: every config of SWEEP (and dap.CONFIGS) at every budget: rel err vs the torch reference, ms
(CUDA events, median of --reps back-to-back launches after warm-up), GB/s = K+V bytes / time;
shared memory / registers / spills of the compiled main kernel where Triton exposes them.
Edge check (correctness only, every config): contexts 0 / 1 / 15 / 16 / 17 / 300 / 1000 at 5 and 132
programs.
Baselines: split-KV kernel (decode_attention.py) full grid and max_programs = budget; a plain read
of the same bytes on `budget` programs: "stream x1" = overlap_gpu.py's probe (one 64 KB tile per
iteration), "stream x2" = two independent 64 KB tiles per iteration (twice the bytes in flight).
Each variant is guarded (compile errors, shared-memory overflow: one line, then the next config);
after --deadline seconds the remaining configs are skipped, the ranking is printed anyway.
Output: a ranked table per case and budget, then one line per budget with the best config as a
Python literal (`BEST[44] = PersistentDecodeConfig(...)`) and the best single config over budgets.
Exit status 1 if any correctness check failed (rel err >= 1e-2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow.kernels import decode_attention as split_kv  # noqa: E402
from nanoflow.kernels import decode_attention_persistent as dap  # noqa: E402
from nanoflow.kernels import reference  # noqa: E402

HQ, HK, D, BLOCK = 32, 8, 128, 16
CASES = {"R512": (512, 1024, 1280), "R128": (128, 4096, 4096)}   # name: (R, ctx lo, ctx hi)
BUDGETS = (32, 44, 66, 132)
DT = torch.bfloat16
DEV = torch.device("cuda")
TOL = 1e-2
C = dap.PersistentDecodeConfig

# Most promising first (the deadline cuts from the end). "tm" shared memory per buffer at D=128
# bf16: tile 64 x HB 1 = 36 KB, tile 128 x HB 1 = 68 KB, tile 64 x HB 2 = 72 KB; triton allocates
# num_stages buffers (wgmma reads them in place), 227 KB per SM: see CONFIGS' comment in the module.
SWEEP = (
    C(tile_n=128, heads_per_item=1, num_warps=8, num_stages=3, variant="tm"),
    C(tile_n=64, heads_per_item=2, num_warps=4, num_stages=3, variant="tm"),
    C(tile_n=128, heads_per_item=1, num_warps=16, num_stages=3, variant="tm"),
    C(tile_n=64, heads_per_item=1, num_warps=4, num_stages=6, variant="tm"),
    C(tile_n=64, heads_per_item=1, num_warps=8, num_stages=6, variant="tm"),
    C(tile_n=64, heads_per_item=1, num_warps=4, num_stages=5, variant="tm"),
    C(tile_n=128, heads_per_item=1, num_warps=4, num_stages=3, variant="tm"),
    C(tile_n=64, heads_per_item=1, num_warps=8, num_stages=4, variant="tm"),
    C(tile_n=32, heads_per_item=4, num_warps=8, num_stages=3, variant="tm"),   # M=32: mma.sync
    C(tile_n=32, heads_per_item=4, num_warps=8, num_stages=3, variant="hm"),   # round-4 best
    C(tile_n=64, heads_per_item=2, num_warps=8, num_stages=3, variant="hm"),
)


class Run:
    def __init__(self, deadline_s: float):
        self.t0 = time.time()
        self.deadline_s = deadline_s
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.skipped: list[str] = []

    def late(self) -> bool:
        return time.time() - self.t0 > self.deadline_s

    def add(self, **row):
        self.rows.append(row)
        return row


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def time_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median of `reps` back-to-back launches, each between two CUDA events (the GPU stays busy:
    every launch here takes >= 0.3 ms, far more than its host-side launch cost)."""
    for _ in range(warmup):
        fn()
    marks = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        marks.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in marks)


def make_case(num_requests: int, lo: int, hi: int, gen: torch.Generator):
    lens = torch.randint(lo, hi + 1, (num_requests,), generator=gen, dtype=torch.int32).to(DEV)
    blocks = (lens + BLOCK - 1) // BLOCK
    max_blocks, num_blocks = int(blocks.max()), int(blocks.sum())
    table = torch.zeros(num_requests, max_blocks, dtype=torch.int32, device=DEV)
    perm = torch.randperm(num_blocks, generator=gen, dtype=torch.int32).to(DEV)
    table[torch.arange(max_blocks, device=DEV)[None, :] < blocks[:, None]] = perm
    kc = torch.randn(num_blocks, BLOCK, HK, D, device=DEV, dtype=DT)
    vc = torch.randn(num_blocks, BLOCK, HK, D, device=DEV, dtype=DT)
    q = torch.randn(num_requests, HQ, D, device=DEV, dtype=DT)
    kv_bytes = int(lens.sum()) * HK * D * 2 * 2
    want = reference.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5)
    return dict(q=q, kc=kc, vc=vc, table=table, lens=lens, kv_bytes=kv_bytes, want=want)


# ---------------------------------------------------------------- compiled-kernel facts

def _compiled(fn) -> dict:
    """id -> CompiledKernel of a @triton.jit function (layout of device_caches varies by version)."""
    found = {}
    try:
        for entry in fn.device_caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for kern in cache.values():
                found[id(kern)] = kern
    except Exception:  # noqa: BLE001
        pass
    return found


def kernel_facts(kern) -> dict:
    facts = {}
    for key, get in (("smem", lambda k: k.metadata.shared), ("regs", lambda k: k.n_regs),
                     ("spills", lambda k: k.n_spills)):
        try:
            facts[key] = int(get(kern))
        except Exception:  # noqa: BLE001
            pass
    return facts


def main_kernel(cfg) -> object:
    return dap._decode_tm_kernel if cfg.variant == "tm" else dap._decode_hm_kernel


# ---------------------------------------------------------------- bandwidth probes

@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, num_tiles, ROWS: tl.constexpr, COLS: tl.constexpr,
                        UNROLL: tl.constexpr):
    """Program p sums contiguous [ROWS, COLS] tiles; UNROLL independent tiles per iteration."""
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    acc = tl.zeros([ROWS, COLS], tl.float32)
    groups = num_tiles // UNROLL
    for t in range(tl.program_id(0).to(tl.int64), groups, tl.num_programs(0)):
        if UNROLL == 1:
            acc += tl.load(x_ptr + t * (ROWS * COLS) + offs).to(tl.float32)
        else:
            a = tl.load(x_ptr + (2 * t) * (ROWS * COLS) + offs)
            b = tl.load(x_ptr + (2 * t + 1) * (ROWS * COLS) + offs)
            acc += a.to(tl.float32) + b.to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def probes(run: Run, case: dict, reps: int):
    kc, vc = case["kc"], case["vc"]
    sink = torch.empty(1024, device=DEV, dtype=torch.float32)
    rows, cols = 64, 512
    tiles = kc.numel() // (rows * cols) // 2 * 2
    nbytes = 2 * tiles * rows * cols * 2
    for unroll in (1, 2):
        for budget in BUDGETS:
            def fn(b=budget, u=unroll):
                for x in (kc, vc):
                    _stream_read_kernel[(b,)](x, sink, tiles, ROWS=rows, COLS=cols, UNROLL=u,
                                              num_warps=16, num_stages=4)
            name = f"stream x{unroll}"
            try:
                ms = time_ms(fn, reps)
            except Exception as exc:  # noqa: BLE001
                print(f"  {name} P={budget}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            run.add(case="R512", kind="stream", name=name, budget=budget, ms=ms, gbs=nbytes / ms / 1e6)


# ---------------------------------------------------------------- the sweep

def sweep_case(run: Run, cname: str, case: dict, configs, reps: int, broken: set, facts_of: dict):
    q, kc, vc, table, lens = case["q"], case["kc"], case["vc"], case["table"], case["lens"]
    scale = D ** -0.5
    out = torch.empty_like(q)
    kv_bytes = case["kv_bytes"]
    max_ctx = int(lens.max())

    def one(kind, name, budget, fn, cfg=None, facts=None):
        try:
            out.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            err = rel_err(out, case["want"])
            ms = time_ms(fn, reps)
        except Exception as exc:  # noqa: BLE001
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            print(f"  {cname} {name} P={budget}: FAILED {type(exc).__name__}: {line[:200]}", flush=True)
            run.add(case=cname, kind=kind, name=name, budget=budget, error=f"{type(exc).__name__}: {line}")
            return False
        if not err < TOL:
            run.failures.append(f"{cname} {name} P={budget}: rel err {err:.2e}")
        row = run.add(case=cname, kind=kind, name=name, budget=budget, ms=ms, gbs=kv_bytes / ms / 1e6,
                      err=err, config=repr(cfg) if cfg else None, **(facts or {}))
        print(f"  {cname} {name:<34} P={budget:<4} {ms:8.4f} ms {row['gbs']:6.0f} GB/s  err {err:.1e}"
              + (f"  smem {facts.get('smem', '?')} regs {facts.get('regs', '?')} spills "
                 f"{facts.get('spills', '?')}" if facts else ""), flush=True)
        return True

    for budget in (None,) + BUDGETS:
        one("split_kv", f"split-KV grid={'full' if budget is None else budget}", budget or 0,
            lambda b=budget: split_kv.paged_decode_attention(q, kc, vc, table, lens, scale, max_programs=b,
                                                             max_seq_len=max_ctx, out=out))
    for cfg in configs:
        if cfg in broken:
            continue
        if run.late():
            run.skipped.append(f"{cname} {cfg.describe()}")
            continue
        before = _compiled(main_kernel(cfg))
        for budget in BUDGETS:
            ok = one("persistent", cfg.describe(), budget,
                     lambda b=budget, c=cfg: dap.paged_decode_attention(q, kc, vc, table, lens, scale,
                                                                        num_programs=b, out=out, config=c),
                     cfg, facts_of.get(cfg))
            if not ok:            # compile error / shared-memory overflow: same for every budget
                broken.add(cfg)
                break
            if cfg not in facts_of:  # the first launch compiled it (the same binary serves both cases)
                new = [k for i, k in _compiled(main_kernel(cfg)).items() if i not in before]
                facts_of[cfg] = kernel_facts(new[-1]) if new else {}
                run.rows[-1].update(facts_of[cfg])


def edge_check(run: Run, configs, broken: set, gen: torch.Generator):
    """Correctness only, every config: empty / 1-token / block-edge / long contexts, at 5 programs
    (items cut) and 132 (more programs than tiles). Block tables padded to 64 columns so the
    kernels compiled for the timed cases are reused."""
    lens_list = [0, 1, 15, 16, 17, 300, 1000]
    lens = torch.tensor(lens_list, dtype=torch.int32, device=DEV)
    blocks = [(n + BLOCK - 1) // BLOCK for n in lens_list]
    table = torch.zeros(len(lens_list), 64, dtype=torch.int32, device=DEV)
    perm = torch.randperm(sum(blocks), generator=gen, dtype=torch.int32).to(DEV)
    used = 0
    for r, nb in enumerate(blocks):
        table[r, :nb] = perm[used:used + nb]
        used += nb
    kc = torch.randn(sum(blocks), BLOCK, HK, D, device=DEV, dtype=DT)
    vc = torch.randn(sum(blocks), BLOCK, HK, D, device=DEV, dtype=DT)
    q = torch.randn(len(lens_list), HQ, D, device=DEV, dtype=DT)
    want = reference.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5)
    bad = []
    for cfg in configs:
        if cfg in broken:
            continue
        for budget in (5, 132):
            try:
                out = torch.full_like(q, float("nan"))
                dap.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5, num_programs=budget,
                                           out=out, config=cfg)
                err = rel_err(out, want)
            except Exception as exc:  # noqa: BLE001
                err = float("nan")
                print(f"  edge {cfg.describe()} P={budget}: FAILED {type(exc).__name__}")
            run.add(case="edge", kind="edge", name=cfg.describe(), budget=budget, err=err)
            if not err < TOL:
                bad.append(f"{cfg.describe()} P={budget} ({err:.1e})")
                run.failures.append(f"edge {cfg.describe()} P={budget}: rel err {err:.2e}")
    print(f"\n-- edge contexts {lens_list}: {len(configs) - len(broken)} configs x P=5/132: "
          + ("all rel err < 1e-2" if not bad else "FAILED " + ", ".join(bad)), flush=True)


# ---------------------------------------------------------------- report

def ranking(run: Run):
    ok = [r for r in run.rows if "error" not in r]
    stream = {(r["name"], r["budget"]): r["gbs"] for r in ok if r["kind"] == "stream"}
    best: dict = {}
    for cname in CASES:
        for budget in BUDGETS:
            rows = sorted((r for r in ok if r["case"] == cname and r["kind"] == "persistent"
                           and r["budget"] == budget), key=lambda r: -r["gbs"])
            split = [r for r in ok if r["case"] == cname and r["kind"] == "split_kv"
                     and r["budget"] in (budget, 0)]
            s1, s2 = stream.get(("stream x1", budget)), stream.get(("stream x2", budget))
            print(f"\n== {cname}  P={budget}   stream x1 {s1 or float('nan'):.0f} / x2 "
                  f"{s2 or float('nan'):.0f} GB/s   "
                  + "   ".join(f"{r['name']} {r['gbs']:.0f}" for r in split))
            print(f"  {'#':>2} {'config':<36} {'ms':>8} {'GB/s':>6} {'%x1':>5} {'err':>8} {'smem':>7} "
                  f"{'regs':>4} {'spill':>5}")
            for i, r in enumerate(rows):
                pct = 100 * r["gbs"] / s1 if s1 else float("nan")
                print(f"  {i + 1:>2} {r['name']:<36} {r['ms']:8.4f} {r['gbs']:6.0f} {pct:5.0f} {r['err']:8.1e} "
                      f"{r.get('smem', '-'):>7} {r.get('regs', '-'):>4} {r.get('spills', '-'):>5}")
            if rows:
                best[(cname, budget)] = rows[0]
    print("\n== best per budget (by the R512 case; R128 in the comment). Paste as the default:")
    for budget in BUDGETS:
        b = best.get(("R512", budget))
        o = best.get(("R128", budget))
        if b:
            print(f"BEST[{budget}] = {b['config']}  # {b['gbs']:.0f} GB/s R512; R128 best "
                  f"{o['gbs']:.0f} GB/s ({o['name']})" if o else f"BEST[{budget}] = {b['config']}")
    # One config for every budget: the best geometric mean of GB/s over all budgets and both cases.
    by_cfg: dict = {}
    for r in ok:
        if r["kind"] == "persistent":
            by_cfg.setdefault(r["config"], {})[(r["case"], r["budget"])] = r["gbs"]
    keys = [(c, b) for c in CASES for b in BUDGETS]
    scored = [(math.exp(sum(math.log(v[k]) for k in keys) / len(keys)), cfg)
              for cfg, v in by_cfg.items() if all(k in v for k in keys)]
    scored.sort(reverse=True)
    for score, cfg in scored[:3]:
        v = by_cfg[cfg]
        print(f"# single config, geomean {score:.0f} GB/s: {cfg}  (R512 "
              + " / ".join(f"{v[('R512', b)]:.0f}" for b in BUDGETS) + f" at P={'/'.join(map(str, BUDGETS))})")
    if scored:
        print(f"DEFAULT = {scored[0][1]}")
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=150.0,
                        help="seconds after which the remaining configs are skipped")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    run = Run(args.deadline)
    props = torch.cuda.get_device_properties(DEV)
    print(f"device: {props.name} ({props.multi_processor_count} SMs)  torch {torch.__version__}  "
          f"triton {triton.__version__}  reps {args.reps} (median)", flush=True)
    configs = list(SWEEP) + [c for c in dap.CONFIGS if c not in SWEEP]
    print(f"{len(configs)} configs x budgets {BUDGETS}; default now: {dap.default_config(D, 2)!r}")
    gen = torch.Generator().manual_seed(0)
    broken: set = set()
    facts_of: dict = {}   # config -> smem / regs / spills of its main kernel
    for cname in args.cases.split(","):
        try:
            case = make_case(*CASES[cname], gen)
            print(f"\n-- case {cname}: R={case['q'].shape[0]} ctx {CASES[cname][1]}-{CASES[cname][2]}, "
                  f"K+V {case['kv_bytes'] / 1e9:.2f} GB  ({time.time() - run.t0:.0f} s)", flush=True)
            if cname == "R512":
                probes(run, case, args.reps)
            sweep_case(run, cname, case, configs, args.reps, broken, facts_of)
            del case
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    try:
        edge_check(run, configs, broken, gen)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    ranking(run)
    if run.skipped:
        print(f"\nskipped after the {args.deadline:.0f} s deadline: " + "; ".join(run.skipped))
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "decode_sweep.json"
        path.write_text(json.dumps(dict(device=props.name, sms=props.multi_processor_count,
                                        torch=torch.__version__, triton=triton.__version__,
                                        rows=run.rows, failures=run.failures, skipped=run.skipped),
                                   indent=1))
        print(f"\nwrote {path}")
    print(f"\nelapsed {time.time() - run.t0:.0f} s")
    if run.failures:
        print("FAILED checks:\n  " + "\n  ".join(run.failures))
        sys.exit(1)
    print(f"all checks passed (rel err < {TOL})")


if __name__ == "__main__":
    main()
