"""Tensor-parallel checks on a multi-GPU machine (CI checks the same on CPU over gloo):
1. tiny random checkpoints, fp32 and bf16: TP=N greedy tokens equal TP=1's, sequential and under the
   TP plan (tp-nano-4) and a dense plan folded onto the TP layer (overlap-2);
2. a dummy preset (default llama-3-70b) at TP=N: the plans give the sequential plan's tokens, and
   one step's time per plan (a dense batch of decode + prefill), with NCCL's CTA limit off and on.
Prints a short table; exits non-zero on a fp32 mismatch.

    python benchmarks/tp_gpu_check.py --tp 4 --model llama-3-70b --json $OUT/tp_check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow import LLM, SamplingParams  # noqa: E402
from tests.tiny_checkpoints import make_checkpoint  # noqa: E402

PLANS = ("sequential", "tp-nano-4", "overlap-2")


def greedy(llm, prompts, max_tokens: int = 24) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def tiny_checks(tp: int, rows: list[dict]) -> int:
    failures = 0
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("llama-gqa", "mistral", "mixtral"):
            path = str(make_checkpoint(name, Path(tmp)))
            prompts = [torch.randint(10, 4000, (int(n),), generator=g).tolist() for n in (3, 17, 70, 150)]
            for dtype in ("float32", "bfloat16"):
                kw = dict(dtype=dtype, num_kv_blocks=512, max_num_batched_tokens=64, gpu_memory_utilization=0.5)
                ref = greedy(LLM(model=path, **kw), prompts)
                llm = LLM(model=path, tensor_parallel_size=tp, **kw)
                for plan in PLANS:
                    llm.set_plan(plan)
                    got = greedy(llm, prompts)
                    same = sum(a == b for a, b in zip(ref, got))
                    rows.append({"check": f"{name} {dtype} TP={tp} {plan} == TP=1", "same": same, "of": len(prompts)})
                    print(f"{name:9s} {dtype:9s} TP={tp} plan {plan:11s} == TP=1 sequential: {same}/{len(prompts)}",
                          flush=True)
                    failures += dtype == "float32" and same != len(prompts)
                llm.engine.shutdown()
    return failures


def preset_checks(model: str, tp: int, rows: list[dict], max_ctas: list[int | None]) -> int:
    from nanoflow.autosearch.profile import dense_batch
    from nanoflow.pipeline.workload_class import workload_class_for_engine
    from nanoflow.entrypoints.tune import time_plans
    from nanoflow.pipeline.plan import load_plan
    failures = 0
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
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=torch.cuda.device_count())
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--max-ctas", default="none,16", help="NCCL CTA limits to try, 'none' = NCCL's choice")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"TP={args.tp}, {time.strftime('%Y-%m-%d')}", flush=True)
    rows: list[dict] = []
    failures = 0 if args.skip_tiny else tiny_checks(args.tp, rows)
    ctas = [None if c == "none" else int(c) for c in args.max_ctas.split(",")]
    failures += preset_checks(args.model, args.tp, rows, ctas)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "tp": args.tp,
                                               "rows": rows}, indent=1) + "\n")
    print("FAILED" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
