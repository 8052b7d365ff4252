"""KV admission rules on the CPU: the real Scheduler and block pool over an offline batch, no model.

    python benchmarks/admission_sim.py --workload sharegpt --num-requests 1500 --num-blocks 18780

Every request arrives at once and runs to its exact output length (as `bench throughput` does); each
step advances every scheduled request (a decode by one token). Prints, per rule ('reserve', 'peak'),
the steps to finish, the mean decode rows per step (what a KV-bound decode step amortises its weight
reads over), the preemptions and the host ms per schedule(). Step counts are not times: the GPU decides
those (`nanoflow bench throughput --kv-admission peak`). Pools: 18,780 blocks of 16 = mixtral-8x7b on
an H200 (bf16 KV); ~29,000 = llama-3-8b on an H100.
"""
from __future__ import annotations

import argparse
import time

from nanoflow.bench.workloads import parse_workload, sample_requests
from nanoflow.engine.kv_cache import KVCacheManager
from nanoflow.engine.request import Request, RequestStatus
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.sampling_params import SamplingParams


def simulate(requests, admission: str, num_blocks: int, block_size: int, budget: int, max_seqs: int) -> dict:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(budget, max_seqs, kv_admission=admission), kv)
    for i, r in enumerate(requests):
        params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
        sched.add(Request(f"r{i}", list(r.prompt_token_ids), params, r.output_len, i))
    steps = rows = 0
    host = 0.0
    while sched.has_unfinished():
        t0 = time.perf_counter()
        out = sched.schedule()
        host += time.perf_counter() - t0
        steps += 1
        rows += out.num_decode
        for req, n in out.scheduled:
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(1)
                if len(req.output_token_ids) >= req.max_tokens:
                    sched.finish(req, RequestStatus.FINISHED_LENGTH)
    return dict(steps=steps, decode_rows=rows / steps, preemptions=sched.stats.num_preemptions,
                host_ms=1e3 * host / steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="sharegpt")
    ap.add_argument("--num-requests", type=int, default=1500)
    ap.add_argument("--num-blocks", type=int, default=18780)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    requests = sample_requests(parse_workload(args.workload), args.num_requests, args.seed, 32000, args.max_model_len)
    print(f"{args.workload}, {len(requests)} requests, {args.num_blocks} blocks of {args.block_size}, "
          f"budget {args.token_budget}")
    print(f"{'rule':8} {'steps':>7} {'decode rows/step':>17} {'preemptions':>12} {'host ms/step':>13}")
    base = None
    for admission in ("reserve", "peak"):
        r = simulate(requests, admission, args.num_blocks, args.block_size, args.token_budget, args.max_num_seqs)
        base = base or r
        print(f"{admission:8} {r['steps']:>7} {r['decode_rows']:>17.1f} {r['preemptions']:>12} {r['host_ms']:>13.3f}"
              f"   rows x{r['decode_rows'] / base['decode_rows']:.2f}")


if __name__ == "__main__":
    main()
