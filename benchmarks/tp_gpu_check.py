"""Tensor-parallel plans on a dummy preset (default llama-3-70b) at TP=N on a multi-GPU machine: how
many greedy sequences each plan shares with the sequential plan (bf16: reported), and one step's
time per plan (a dense batch of decode + prefill), with NCCL's CTA limit off and on. Prints a short
table. (TP=N == TP=1 tokens on fp32 tiny checkpoints: tests/gpu/test_tp_gpu.py.)

    python benchmarks/tp_gpu_check.py --tp 4 --model llama-3-70b --json $OUT/tp_check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow import LLM, SamplingParams  # noqa: E402

PLANS = ("sequential", "tp-nano-4", "overlap-2")


def greedy(llm, prompts, max_tokens: int = 24) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def preset_checks(model: str, tp: int, rows: list[dict], max_ctas: list[int | None]) -> None:
    from nanoflow.autosearch.profile import dense_batch
    from nanoflow.pipeline.workload_class import workload_class_for_engine
    from nanoflow.entrypoints.tune import time_plans
    from nanoflow.pipeline.plan import load_plan
    for ctas in max_ctas:
        llm = LLM(model=model, load_format="dummy", tensor_parallel_size=tp, max_num_batched_tokens=2048,
                  tp_collective_max_ctas=ctas)
        vocab = llm.model_config.vocab_size
        prompts = [torch.randint(10, vocab - 10, (int(n),)).tolist() for n in (5, 40, 300, 900)] * 4
        tokens = {}
        for plan in PLANS:
            llm.set_plan(plan)
            tokens[plan] = greedy(llm, prompts, 16)
        for plan in PLANS[1:]:
            same = sum(a == b for a, b in zip(tokens["sequential"], tokens[plan]))
            rows.append({"check": f"{model} TP={tp} ctas={ctas} {plan} == sequential", "same": same, "of": len(prompts)})
            print(f"{model} TP={tp} max_ctas={ctas}: plan {plan} == sequential: {same}/{len(prompts)}", flush=True)
        wl = workload_class_for_engine(llm.engine, "constant:1024:512")  # its steady batch, fitted to the KV cache
        with dense_batch(llm.engine, wl) as batch:
            ms = time_plans(llm.engine, batch, [load_plan(p) for p in PLANS], reps=5, rounds=2, progress=False)
        print(f"step: {wl.describe()}", flush=True)
        for plan, t in zip(PLANS, ms):
            rows.append({"check": f"{model} TP={tp} ctas={ctas} step ms {plan}", "ms": t, "vs_sequential": ms[0] / t})
            print(f"{model} TP={tp} max_ctas={ctas}: {plan:11s} {t:8.2f} ms/step  {ms[0] / t:.3f}x sequential",
                  flush=True)
        llm.engine.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=torch.cuda.device_count())
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--max-ctas", default="none,16", help="NCCL CTA limits to try, 'none' = NCCL's choice")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"TP={args.tp}, {time.strftime('%Y-%m-%d')}", flush=True)
    rows: list[dict] = []
    ctas = [None if c == "none" else int(c) for c in args.max_ctas.split(",")]
    preset_checks(args.model, args.tp, rows, ctas)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "tp": args.tp,
                                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
