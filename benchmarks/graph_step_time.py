"""Host and device time of one forward step, eager against CUDA-graph replay, per plan (one GPU):
runner.forward on one decode batch of 48 requests of the built-in tiny model (4 layers), every plan on every
step (min_attn_share 0), sync scheduling so every token is on the host when the batch is built.
Also prints each plan's graph mode (single graph, one per segment, eager) and the green-context
probe. (The token checks of graphs for every plan are tests/gpu/test_graphs_gpu.py.)

    python3 benchmarks/graph_step_time.py [--plans sequential,nano-4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow import LLM, SamplingParams  # noqa: E402
from nanoflow.pipeline.plan import load_plan  # noqa: E402


def every_step(plan: str, tmp: Path) -> str:
    d = load_plan(plan).to_dict()
    d["min_attn_share"] = 0.0
    path = tmp / f"{plan}-all.json"
    path.write_text(json.dumps(d))
    return str(path)


def host_ms_per_step(llm: LLM, reps: int) -> tuple[float, float]:
    """(median host ms, mean device ms) of runner.forward on one decode batch of 48 requests."""
    eng = llm.engine
    g = torch.Generator().manual_seed(5)
    for i in range(48):
        eng.add_request(f"h{i}", torch.randint(10, 4000, (60,), generator=g).tolist(),
                        SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    eng.step()
    batch = eng.runner.build_batch(eng.scheduler.schedule())
    for _ in range(3):
        eng.runner.forward(batch)
    torch.cuda.synchronize()
    host = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        t0 = time.perf_counter()
        eng.runner.forward(batch)
        host.append((time.perf_counter() - t0) * 1e3)
    end.record()
    torch.cuda.synchronize()
    return statistics.median(host), start.elapsed_time(end) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", default="sequential,overlap-2,nano-4,overlap-split")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    os.environ.setdefault("NANOFLOW_CACHE_DIR", tempfile.mkdtemp())  # no tuned profile: plans on every step
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for plan in args.plans.split(","):
            for graphs in (False, True):
                llm = LLM(model="default", dtype="float32", num_kv_blocks=1024, block_size=16, max_num_batched_tokens=256,
                          gpu_memory_utilization=0.5, enforce_eager=not graphs, plan=every_step(plan, tmp),
                          async_scheduling=False, plan_choice="predicted")
                h, dev = host_ms_per_step(llm, args.reps)
                info = next((p for p in llm.engine.runner.graphs.describe()
                             if p["plan"] != "sequential" or plan == "sequential"), {}) if graphs else {}
                rows.append({"plan": plan, "graphs": graphs, "host_ms": round(h, 3), "device_ms": round(dev, 3),
                             "mode": info.get("mode"), "probe": info.get("probe")})
                print(f"{plan:14} {'graphs' if graphs else 'eager ':6} host {h:7.3f} ms  device {dev:7.3f} ms  "
                      f"{'mode ' + str(info.get('mode')) if graphs else ''}", flush=True)
                llm.engine.shutdown()
    probe = next((r["probe"] for r in rows if r.get("probe")), None)
    if probe:
        print(f"green-context probe: {probe}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                              indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
