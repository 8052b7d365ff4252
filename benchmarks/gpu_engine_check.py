"""GPU checks of the engine (run on the device machine; CI has no GPU):
1. greedy tokens of the Triton path equal those of the torch path on a small model (fp32 and bf16);
2. llama-3-8b with dummy weights generates on the Triton path (tokens finite, lengths exact).
Prints a short table; exits non-zero on a mismatch."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow import LLM, SamplingParams  # noqa: E402
from nanoflow.pipeline.plan import load_plan  # noqa: E402
from tests.tiny_checkpoints import make_checkpoint  # noqa: E402


def greedy_tokens(path: str, dtype: str, use_triton: str, prompts, enforce_eager: bool = True,
                  plan: str = "sequential") -> list[list[int]]:
    llm = LLM(model=path, dtype=dtype, use_triton=use_triton, num_kv_blocks=512, block_size=16,
              max_num_batched_tokens=64, gpu_memory_utilization=0.5, enforce_eager=enforce_eager, plan=plan)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def main() -> int:
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failures = 0
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # overlap-split on every step (min_attn_share 0): streams on a green-context SM split.
        split_all = Path(tmp) / "overlap-split-all.json"
        split_plan = load_plan("overlap-split").to_dict()
        split_plan["min_attn_share"] = 0.0
        split_all.write_text(json.dumps(split_plan))
        for name in ("llama-gqa", "qwen2"):
            path = str(make_checkpoint(name, Path(tmp)))
            prompts = [torch.randint(10, 4000, (int(n),), generator=g).tolist() for n in (3, 17, 70, 150)]
            for dtype in ("float32", "bfloat16"):
                ref = greedy_tokens(path, dtype, "off", prompts)
                tri = greedy_tokens(path, dtype, "on", prompts)
                same = sum(a == b for a, b in zip(ref, tri))
                # bf16: the two paths round differently, so a near-tie may flip a later token.
                prefix = min(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                             for a, b in zip(ref, tri))
                print(f"{name:10s} {dtype:9s} triton==torch sequences {same}/{len(prompts)}, "
                      f"shortest common prefix {prefix}/24")
                if dtype == "float32" and same != len(prompts):
                    failures += 1
                for label, kw in (("cuda graphs", dict(enforce_eager=False)), ("plan overlap-2", dict(plan="overlap-2")),
                                  ("plan nano-4", dict(plan="nano-4")),
                                  ("plan overlap-split (SM split)", dict(plan=str(split_all)))):
                    other = greedy_tokens(path, dtype, "on", prompts, **kw)
                    same_other = sum(a == b for a, b in zip(tri, other))
                    print(f"{name:10s} {dtype:9s} {label} == eager sequential: {same_other}/{len(prompts)}")
                    failures += dtype == "float32" and same_other != len(prompts)
    t0 = time.perf_counter()
    llm = LLM(model="llama-3-8b", load_format="dummy")  # CUDA graphs captured at start-up
    t1 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": list(range(100, 100 + n))} for n in (5, 300, 1000)],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    t2 = time.perf_counter()
    lens = [len(o.outputs[0].token_ids) for o in outs]
    print(f"llama-3-8b dummy: load {t1 - t0:.1f}s, generate {t2 - t1:.2f}s, output lengths {lens}, "
          f"kv blocks {llm.engine.kv.pool.num_blocks}, first tokens {outs[0].outputs[0].token_ids[:8]}")
    failures += lens != [32, 32, 32]
    print("FAILED" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
