"""Where a step's time goes: llama-3-8b dummy on the GPU, a prefill-heavy and a decode-only phase of
constant 1024:512, each profiled over a few steps with torch.profiler (kernel time by name) and CUDA
events (device busy vs. idle between steps). Run on the device machine."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--phases", default="60,380", help="steps at which to profile (comma list)")
    ap.add_argument("--steps", type=int, default=4, help="steps profiled per phase")
    ap.add_argument("--engine-args", default="", help="k=v,... extra EngineConfig fields")
    args = ap.parse_args()
    extra = dict(kv.split("=") for kv in args.engine_args.split(",") if kv)
    extra = {k: (int(v) if v.isdigit() else v) for k, v in extra.items()}
    llm = LLM(model="llama-3-8b", load_format="dummy", **extra)
    eng = llm.engine
    g = torch.Generator().manual_seed(0)
    for i in range(args.requests):
        ids = torch.randint(10, 120000, (1024,), generator=g).tolist()
        eng.add_request(str(i), ids, SamplingParams(max_tokens=512, ignore_eos=True))
    phases = sorted(int(p) for p in args.phases.split(","))
    step = 0
    for target in phases:
        while step < target:
            eng.step()
            step += 1
        torch.cuda.synchronize()
        eng.start_gpu_timeline()
        host = []
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                eng.step()
                host.append(time.perf_counter() - t0)
                step += 1
            torch.cuda.synchronize()
        tokens = [n for _, _, n in eng.step_times[-args.steps:]]
        idle = eng.gpu_idle_stats()
        print(f"\n=== steps {target}..{target + args.steps}: running {len(eng.scheduler.running)}, "
              f"tokens/step {tokens}, host ms/step {[round(1000 * h, 1) for h in host]}")
        print(f"device busy {idle['busy_ms'] / idle['steps']:.2f} ms/step, idle between steps "
              f"{idle['mean_idle_gap_ms']:.3f} ms")
        try:
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        except Exception:  # noqa: BLE001 - column names differ across torch versions
            table = prof.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=60)
        print(table)


if __name__ == "__main__":
    main()
