"""Driver for Nsight Compute: the split-KV decode kernel (default full-occupancy config) and a plain
streaming read of the same bytes, each launched 4 times on the 64-SM group of a green-context split.

    ncu --clock-control none --kernel-name regex:'_decode_split_kernel|_read_kernel' --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section SchedulerStats python3 docs/research/green-contexts/ncu_decode_partition.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts of this study

from decode_partition_sweep_gpu import _read_kernel  # noqa: E402
from green_ctx_gpu import D, decode_inputs  # noqa: E402
from nanoflow.kernels import decode_attention as split_kv  # noqa: E402
from nanoflow.pipeline import sm_partition  # noqa: E402

DEV = torch.device("cuda")
q, kc, vc, table, lens, _ = decode_inputs(286, 1024, 1400)
part = sm_partition.split_sms(DEV, 64)
sink = torch.empty(4096, device=DEV, dtype=torch.float32)
with torch.cuda.stream(part.streams[0]):
    for _ in range(4):
        split_kv.paged_decode_attention(q, kc, vc, table, lens, D ** -0.5, max_seq_len=1400)
    for _ in range(4):
        _read_kernel[(64,)](kc, sink, kc.numel() // (64 * 512), ROWS=64, COLS=512, num_warps=16, num_stages=4)
torch.cuda.synchronize()
print("done")
