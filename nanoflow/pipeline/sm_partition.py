"""SM partitions through CUDA green contexts: one split of the device's SMs into a group of N SMs and
the remaining ones, each with its own stream. Work launched on a partition's stream runs only on that
partition's SMs, so ordinary full-occupancy kernels (cuBLAS, the split-KV decode kernel) can overlap
on disjoint SMs without capping their grids.

One split (cuDevSmResourceSplitByCount) gives disjoint groups; creating two green contexts of N and
132 - N SMs independently may hand both the same SMs. The driver rounds the group up to its
granularity (8 SMs on Hopper): the partition reports the counts it got.

Needs cuda-python (`cuda.bindings.driver`, or the older `cuda.cuda`) and a driver with green contexts
(CUDA 12.4+). `available()` says whether both are there; on CPU it is False.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _driver():
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # older layout
        except ImportError:
            return None
    return driver if hasattr(driver, "cuGreenCtxCreate") else None


def available(device: torch.device) -> bool:
    """Whether SM partitions can be made on this device."""
    return device.type == "cuda" and _driver() is not None


def _check(result):
    """cuda-python returns (status, *values): raise on an error status, return the values."""
    driver = _driver()
    status, *values = result
    if status != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(status)
        raise RuntimeError(f"CUDA driver call failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class SmPartition:
    """Two disjoint SM groups of one device, each with a stream."""

    sm_counts: tuple[int, int]
    """SMs of (the group asked for, the remaining SMs), as the driver rounded them."""
    streams: tuple[torch.cuda.Stream, torch.cuda.Stream]
    """One stream per group: kernels launched on it run on that group's SMs only."""
    _handles: list = field(default_factory=list, repr=False)
    """Green contexts and raw streams, kept alive as long as the partition."""


def split_sms(device: torch.device, num_sms: int, priorities: tuple[int, int] = (0, 0)) -> SmPartition:
    """Split the device into num_sms SMs (rounded up by the driver) and the rest. `priorities` are the
    two streams' CUDA priorities (lower = higher priority)."""
    driver = _driver()
    if driver is None or device.type != "cuda":
        raise RuntimeError("SM partitions need a CUDA device and cuda-python with green contexts")
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).multi_processor_count
    if not 0 < num_sms < total:
        raise ValueError(f"an SM partition needs 0 < num_sms < {total}, got {num_sms}")
    torch.cuda.init()
    torch.empty(1, device=device)  # the primary context exists before green contexts retain it
    cu_device = _check(driver.cuDeviceGet(index))
    whole = _check(driver.cuDeviceGetDevResource(cu_device, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, _, rest = _check(driver.cuDevSmResourceSplitByCount(1, whole, 0, num_sms))
    resources = [groups[0] if isinstance(groups, (list, tuple)) else groups, rest]
    handles, streams, counts = [], [], []
    for resource, priority in zip(resources, priorities):
        desc = _check(driver.cuDevResourceGenerateDesc([resource], 1))
        green = _check(driver.cuGreenCtxCreate(desc, cu_device,
                                               driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        raw = _check(driver.cuGreenCtxStreamCreate(green, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, priority))
        handles += [green, raw]
        streams.append(torch.cuda.ExternalStream(int(raw), device=device))
        counts.append(int(resource.sm.smCount))
    return SmPartition((counts[0], counts[1]), (streams[0], streams[1]), handles)
