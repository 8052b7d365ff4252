"""Plans against each other on the same dense batches: llama-3-8b dummy, constant IN:OUT requests,
device time per step (CUDA events) at a prefill-heavy phase and a decode-only phase, plans alternated
step by step so drift hits all alike. Run on the device machine.

    python3 benchmarks/plan_steps.py --plans sequential,overlap-2,nano-4 [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow import LLM, SamplingParams  # noqa: E402
from nanoflow.pipeline.plan import load_plan  # noqa: E402


def materialise(spec: str, tmp: Path) -> str:
    """A base plan with modifiers, e.g. 'overlap-2:dec=44:gemm=88' (SM budgets of decode_attn / the
    GEMMs: the persistent kernels), 'overlap-2:split=64' (green-context split: the second stream on
    64 SMs, the first on the rest; 'split=64:first=all' leaves the first on all SMs), 'cut=0.6'
    (every decode cut at 0.6), 'share=0.4' (min_attn_share)."""
    base, *mods = spec.split(":")
    if not mods:
        return spec
    plan = load_plan(base).to_dict()
    plan["name"] = spec
    for mod in mods:
        key, value = mod.split("=")
        if key == "split":
            plan["sm_split"] = int(value)
            plan["streams"][0]["sms"] = "rest"
            plan["streams"][1]["sms"] = "split"
            continue
        if key == "first":
            plan["streams"][0]["sms"] = value
            continue
        if key == "share":
            plan["min_attn_share"] = float(value)
            continue
        if key == "cut":
            for op in plan["ops"].values():
                for cut in op.get("cuts", []):
                    if cut["of"] == "decode":
                        cut["at"] = float(value)
            continue
        names = ["decode_attn"] if key == "dec" else ["qkv_gemm", "o_gemm", "gate_up_gemm", "down_gemm"]
        for name in names:
            plan["ops"].setdefault(name, {"stream": plan["streams"][0]["name"]})["sm_budget"] = int(value)
    path = tmp / (spec.replace(":", "_").replace("=", "") + ".json")
    path.write_text(json.dumps(plan))
    return str(path)


def device_ms_of_next_step(eng) -> tuple[float, int]:
    eng.start_gpu_timeline()
    eng.step()
    eng.step()  # the first step's work is measured once the second was launched (async)
    torch.cuda.synchronize()
    start, end = eng._gpu_timeline[0]
    return start.elapsed_time(end), eng.step_times[-2][2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", default="sequential,overlap-2,nano-4")
    ap.add_argument("--phases", default="60,380")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=512)
    args = ap.parse_args()
    labels = args.plans.split(",")
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    plans = [materialise(p, tmp) for p in labels]
    names = dict(zip(plans, labels))
    llm = LLM(model="llama-3-8b", load_format="dummy")
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    for i in range(args.requests):
        eng.add_request(str(i), torch.randint(10, 120000, (args.input_len,), generator=g).tolist(),
                        SamplingParams(max_tokens=args.output_len, ignore_eos=True))
    for plan in plans:  # compile every plan's kernels before measuring
        eng.set_plan(plan)
        eng.step()
    results = {}
    for phase in sorted(int(p) for p in args.phases.split(",")):
        while len(eng.step_times) < phase:
            eng.step()
        times = {p: [] for p in plans}
        tokens = {p: [] for p in plans}
        for _ in range(args.rounds):
            for plan in plans:
                eng.set_plan(plan)
                ms, n = device_ms_of_next_step(eng)
                times[plan].append(ms)
                tokens[plan].append(n)
        base = statistics.median(times[plans[0]]) / statistics.median(tokens[plans[0]])
        print(f"\n=== phase step {phase}: running {len(eng.scheduler.running)}, "
              f"waiting {len(eng.scheduler.waiting)}")
        print(f"{'plan':24s} {'tokens/step':>12s} {'ms/step':>9s} {'us/token':>9s} {'speedup':>8s}")
        for plan in plans:
            ms, n = statistics.median(times[plan]), statistics.median(tokens[plan])
            print(f"{names[plan]:24s} {n:12.0f} {ms:9.2f} {1000 * ms / n:9.2f} {base / (ms / n):8.3f}x")
            results[f"{phase}:{names[plan]}"] = {"ms": times[plan], "tokens": tokens[plan]}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "plan_steps.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
