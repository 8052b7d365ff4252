"""Does a CUDA graph keep kernels on their green-context SM partition?

A kernel launched on a partition's stream runs on that partition's SMs. Captured into a graph, its
node may or may not keep the partition (the driver records the stream's context with the node, or
not), and the capture itself may be refused when it forks across contexts. So before a plan with an
SM split is captured, a small kernel that records the SM each of its programs ran on (%smid, each
program spinning a few microseconds so the programs spread over every SM they may use) is run on
each partition stream: eagerly, inside one graph forked from a primary-context stream (how a whole
step is captured), and inside a graph captured on the partition stream itself (one graph per
segment). A form passes when its kernels used at most the partition's SMs on both sides.
"""
from __future__ import annotations

import torch

_SPIN_NS = 20_000


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def smid_kernel(out_ptr, spin_ns):
        pid = tl.program_id(0)
        t0 = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64,
                                       is_pure=False, pack=1)
        t = t0
        while t - t0 < spin_ns:
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64,
                                          is_pure=False, pack=1)
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(out_ptr + pid, sm)
    return smid_kernel


def distinct_sms(counts_tensor: torch.Tensor) -> int:
    return int(torch.unique(counts_tensor[counts_tensor >= 0]).numel())


def probe_partition(executor, capture_stream: torch.cuda.Stream) -> dict:
    """{'mode': 'single' | 'segmented' | 'eager', 'sms': (split, rest), per form: distinct SMs used
    on each side, 'reason' when eager}. Any failure of a form counts as that form failing."""
    part = executor.partition
    device = executor.device
    kernel = _kernel()
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    out = {"sms": tuple(part.sm_counts)}

    def launch(stream, buf):
        with torch.cuda.stream(stream):
            kernel[(programs,)](buf, _SPIN_NS, num_warps=1)

    def check(form: str, run) -> bool:
        used = []
        try:
            for side, stream in enumerate(part.streams):
                buf = torch.full((programs,), -1, dtype=torch.int32, device=device)
                run(stream, buf)
                torch.cuda.synchronize(device)
                used.append(distinct_sms(buf))
        except Exception as exc:  # noqa: BLE001 - this form does not work here
            torch.cuda.synchronize(device)
            out[form] = f"failed: {type(exc).__name__}: {exc}"[:300]
            return False
        out[form] = used
        return all(u <= limit for u, limit in zip(used, part.sm_counts)) and all(u > 0 for u in used)

    def eager(stream, buf):
        launch(stream, buf)

    def single(stream, buf):  # forked from a primary-context capture stream, joined back
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(capture_stream):
            g.capture_begin()
            try:
                main = torch.cuda.current_stream(device)
                stream.wait_event(main.record_event())
                launch(stream, buf)
                main.wait_stream(stream)
            finally:
                g.capture_end()
        g.replay()

    def segmented(stream, buf):  # captured on the partition stream itself, replayed there
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            g.capture_begin()
            try:
                launch(stream, buf)
            finally:
                g.capture_end()
            g.replay()

    if not check("eager", eager):
        out.update(mode="eager", reason=f"the SM probe kernel did not stay on its partition even eagerly ({out['eager']})")
        return out
    if check("single", single):
        out["mode"] = "single"
    elif check("segmented", segmented):
        out["mode"] = "segmented"
    else:
        out.update(mode="eager", reason=f"graphs do not keep kernels on their partition (single: {out['single']}, "
                                        f"segmented: {out['segmented']})")
    return out
