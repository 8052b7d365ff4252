"""Host time per step at many running decode requests (CPU only; no model): Scheduler.schedule(),
the persistent input batch's prepare() and the engine's per-request bookkeeping, median per step.

    python3 benchmarks/host_step_time.py [--requests 1024] [--contexts 128,1024,4096] [--steps 50]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow.bench.host_step import measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--contexts", default="128,1024,4096")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    print("| requests | context | schedule ms | prepare ms | update ms | total ms | block entries written/step |")
    print("|---|---|---|---|---|---|---|")
    for ctx in (int(c) for c in args.contexts.split(",")):
        r = measure(args.requests, ctx, args.steps)
        print(f"| {r.num_requests} | {r.context} | {r.schedule_ms:.3f} | {r.prepare_ms:.3f} | {r.update_ms:.3f} "
              f"| {r.total_ms:.3f} | {r.entries_written / r.steps:.1f} |")


if __name__ == "__main__":
    main()
