"""GPU checks of prefix caching and the host KV tier (run on the device machine; CI has no GPU).

1. Greedy tokens on the Triton path with prefix caching off, on, on with a small device cache and a
   host tier (copies on the copy stream, ordered by events), with CUDA graphs, and over the turns of a
   conversation, on a tiny checkpoint: identical in fp32 (exit code 1 otherwise), reported in bf16.
2. The host tier on llama-3-8b dummy: 8 GiB of page-locked slots, a save and a load of 256 blocks
   timed with CUDA events (copy-stream bandwidth), and the KV bytes compared after the round trip.
Prints a short table."""
from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow import LLM, SamplingParams  # noqa: E402
from nanoflow.engine.kv_host_tier import HostKVTier  # noqa: E402
from tests.tiny_checkpoints import make_checkpoint  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def shared_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(10, 4000) for _ in range(150)]
    prompts = [system + [rng.randrange(10, 4000) for _ in range(rng.randrange(1, 60))] for _ in range(12)]
    return prompts + [system[:64], system, list(prompts[0])]


def run(path: str, dtype: str, rounds: int = 2, **kw) -> tuple[list[list[list[int]]], object]:
    args = dict(dtype=dtype, use_triton="on", block_size=16, num_kv_blocks=512, max_num_batched_tokens=128,
                gpu_memory_utilization=0.5, enforce_eager=True)
    args.update(kw)
    llm = LLM(model=path, **args)
    outs = []
    for _ in range(rounds):
        res = llm.generate([{"prompt_token_ids": p} for p in shared_prompts()], GREEDY, use_tqdm=False)
        outs.append([o.outputs[0].token_ids for o in res])
    llm.engine.kv.drain()
    llm.engine.check_kv_invariant()
    return outs, llm


def conversation(path: str, dtype: str, **kw) -> list[list[int]]:
    llm = LLM(model=path, dtype=dtype, use_triton="on", block_size=16, gpu_memory_utilization=0.5,
              enforce_eager=True, **kw)
    prompt, answers = shared_prompts(1)[0], []
    for turn in range(3):
        answer = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        answers.append(answer)
        prompt = prompt + answer + [11 + turn] * 20
    return answers


def host_tier_bandwidth() -> None:
    llm = LLM(model="llama-3-8b", load_format="dummy", enforce_eager=True, gpu_memory_utilization=0.6)
    kv = llm.engine.runner.kv_all
    kv.view(torch.uint8).random_(0, 255)  # any bytes: bf16 NaN patterns are copied as they are
    slots = HostKVTier.slots_for_bytes(kv, 8 * (1 << 30))
    tier = HostKVTier(kv, slots)
    n = 256
    blocks = list(range(n))
    before = kv[:, :, :n].clone()
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    start.record(tier.stream)
    tier.save(blocks, list(range(n))).wait()
    mid.record(tier.stream)
    kv[:, :, :n].zero_()
    tier.load(list(range(n)), blocks)
    end.record(tier.stream)
    torch.cuda.synchronize()
    same = torch.equal(kv[:, :, :n].view(torch.uint8), before.view(torch.uint8))
    gb = n * tier.block_bytes / 1e9
    print(f"host tier llama-3-8b: {slots} slots of {tier.block_bytes / 2**20:.1f} MiB ({tier.pinned_by}); "
          f"{n} blocks ({gb:.2f} GB): "
          f"save {start.elapsed_time(mid):.1f} ms ({gb / start.elapsed_time(mid) * 1e3:.1f} GB/s), "
          f"load {mid.elapsed_time(end):.1f} ms ({gb / mid.elapsed_time(end) * 1e3:.1f} GB/s), bytes equal: {same}")
    tier.close()
    if not same:
        raise SystemExit(1)


def main() -> int:
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_checkpoint("llama-gqa", Path(tmp)))
        for dtype in ("float32", "bfloat16"):
            ref, _ = run(path, dtype, rounds=1, enable_prefix_caching=False)
            variants = {
                "caching on": dict(),
                "caching on, host tier, 48 device blocks": dict(num_kv_blocks=48, kv_host_gb=0.05,
                                                                 kv_admission_ratio=2.0),
                "caching on, cuda graphs": dict(enforce_eager=False),
                "caching on, sync scheduling": dict(async_scheduling=False),
            }
            for label, kw in variants.items():
                outs, llm = run(path, dtype, **kw)
                s = llm.engine.stats()
                same = [sum(a == b for a, b in zip(ref[0], o)) for o in outs]
                print(f"{dtype:9s} {label:42s} same as caching off: {same[0]}/{len(ref[0])} cold, "
                      f"{same[1]}/{len(ref[0])} warm; hits {s.prefix_cache_hits}/{s.prefix_cache_queries} tokens, "
                      f"host hits {s.prefix_cache_host_hits}, saved {s.kv_host_blocks_saved}, "
                      f"loaded {s.kv_host_blocks_loaded}, preemptions {s.num_preemptions}")
                failures += dtype == "float32" and same != [len(ref[0])] * 2
                if "host tier" in label and s.kv_host_blocks_loaded == 0:
                    print("  (no host-tier load happened: the check did not exercise the copy-back)")
                    failures += 1
            off = conversation(path, dtype, enable_prefix_caching=False)
            on = conversation(path, dtype, kv_host_gb=0.05, num_kv_blocks=64)
            print(f"{dtype:9s} conversation of 3 turns, caching + host tier == off: {on == off}")
            failures += dtype == "float32" and on != off
    host_tier_bandwidth()
    print("FAILED" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
