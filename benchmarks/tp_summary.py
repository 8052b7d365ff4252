"""Summary of `nanoflow bench throughput --output-json` results of tensor-parallel runs: tokens/s,
per GPU, % of optimal (N x the one-GPU GEMM peak), and the plan vs `--compare` ratio; with a TP=1 and
a TP>1 run of the same model and workload, the per-GPU ratio. Numbers come from the files only.

    python benchmarks/tp_summary.py $OUT/tp4_*.json $OUT/tp2_llama-3-8b.json $OUT/tp1_llama-3-8b.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        r = json.loads(Path(p).read_text())
        gpus = r.get("num_gpus", 1)
        for run in (r, r.get("compare")):
            if run is None:
                continue
            out.append({"file": Path(p).name, "model": r["model"], "workload": r["workload"], "gpus": gpus,
                        "device": r["device_name"], "date": r["date"], "plan": run["plan"],
                        "tok_s": run["total_tokens_per_s"], "tok_s_gpu": run["total_tokens_per_s"] / gpus,
                        "pct": run["pct_of_optimal"], "steady_pct": run["steady_state_pct_of_optimal"],
                        "ratio": r["total_tokens_per_s"] / run["total_tokens_per_s"] if run is not r else None,
                        "gemm_tflops": r["gemm_peak_tflops"]})
    return out


def main(paths: list[str]) -> int:
    table = rows(paths)
    print(f"{'model':<13}{'workload':<19}{'GPUs':>5} {'plan':<12}{'tok/s':>10}{'tok/s/GPU':>11}{'% opt':>7}"
          f"{'% steady':>9}{'main/this':>10}  device, date, file")
    for t in table:
        ratio = f"{t['ratio']:.3f}x" if t["ratio"] is not None else "-"
        steady = f"{t['steady_pct']:.1f}" if t["steady_pct"] is not None else "-"
        print(f"{t['model']:<13}{t['workload']:<19}{t['gpus']:>5} {t['plan']:<12}{t['tok_s']:>10.0f}"
              f"{t['tok_s_gpu']:>11.0f}{t['pct']:>7.1f}{steady:>9}{ratio:>10}  {t['device']}, {t['date']}, {t['file']}")
    mains = [t for t in table if t["ratio"] is None]
    for a in mains:
        for b in mains:
            if a["gpus"] > 1 and b["gpus"] == 1 and (a["model"], a["workload"]) == (b["model"], b["workload"]):
                print(f"{a['model']} {a['workload']}: TP={a['gpus']} / TP=1 tokens/s per GPU = "
                      f"{a['tok_s_gpu'] / b['tok_s_gpu']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
