"""Copy-stream bandwidth of the host KV tier on the GPU: llama-3-8b dummy's KV cache, 8 GiB of
page-locked host slots, a save and a load of 256 blocks timed with CUDA events. The bytes are
compared after the round trip (the correctness checks of prefix caching and the tier are
tests/gpu/test_prefix_gpu.py).

    python3 benchmarks/host_tier_bandwidth.py [--blocks 256] [--host-gb 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoflow import LLM  # noqa: E402
from nanoflow.engine.kv_host_tier import HostKVTier  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=256, help="blocks saved and loaded")
    ap.add_argument("--host-gb", type=float, default=8.0, help="page-locked host slots, GiB")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    llm = LLM(model="llama-3-8b", load_format="dummy", enforce_eager=True, gpu_memory_utilization=0.6)
    kv = llm.engine.runner.kv_all
    kv.view(torch.uint8).random_(0, 255)  # any bytes: bf16 NaN patterns are copied as they are
    slots = HostKVTier.slots_for_bytes(kv, args.host_gb * (1 << 30))
    tier = HostKVTier(kv, slots)
    n = min(args.blocks, slots)
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
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
