"""Starting a tensor-parallel group: one process per rank, torch.distributed rendezvous from the
environment (MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK / LOCAL_RANK).

Two ways in, the same code after:
- under `torchrun` (or any launcher that sets those variables, across nodes too), every process runs
  the user's command; rank 0 goes on as the engine, ranks > 0 serve rank 0 inside LLMEngine(...) and
  exit the process when rank 0 stops them;
- from a plain process (`nanoflow generate --tensor-parallel-size 2 ...`, LLM(...)), that process is
  rank 0: it hosts the rendezvous store and starts ranks 1..N-1 as `python -m
  nanoflow.distributed.worker` with those variables set.
NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set in every rank's environment before NCCL starts, whatever they were.

Failure handling: a launched worker exits when rank 0's process ends (its stdin is a pipe from rank 0:
end of file means rank 0 is gone, however it died), on rank 0's stop message, or when a collective
fails (a rank died mid-step: at once on gloo, after EngineConfig.tp_timeout_s on NCCL). Rank 0 checks
its workers before every step and raises if one has exited; at shutdown it sends the stop message,
waits a few seconds, then terminates and kills what is left.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from nanoflow.config import EngineConfig
from nanoflow.distributed.context import TPContext
from nanoflow.distributed.sharding import check_shardable
from nanoflow.models.config import ModelConfig

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink SHARP / multicast off (never turned on)."""
CONFIG_ENV = "NANOFLOW_TP_CONFIG"
"""The EngineConfig (JSON) rank 0 hands to the workers it launches."""
WATCH_ENV = "NANOFLOW_TP_WATCH_STDIN"
"""Set for launched workers: exit when stdin (a pipe from rank 0) reaches end of file."""
CONTROL_TIMEOUT = timedelta(days=365)
"""Timeout of the control group: a worker idles there for as long as rank 0 has nothing to run."""
STOP = "stop"
"""Rank 0's last message."""
_READY_KEY = "nanoflow_tp/ready/{}"


def set_nvls_off(env: dict) -> None:
    env.update(NVLS_OFF)


def start(config: EngineConfig, model_config: ModelConfig) -> TPContext:
    """Rank 0's entry (LLMEngine): the group of config.tensor_parallel_size ranks. Ranks > 0 of a
    torchrun job never return from here: they serve rank 0, then exit the process."""
    world = config.tensor_parallel_size
    check_shardable(model_config, world)  # before any process starts
    device_type = config.resolved_device().type
    _check_device(config, world, device_type)
    set_nvls_off(os.environ)  # before NCCL reads them (communicators start lazily)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ctx = _join_env_group(config, world, device_type)
        if not ctx.is_driver:
            from nanoflow.distributed.worker import serve
            code = serve(config, ctx)
            raise SystemExit(code)
        return ctx
    return _launch_workers(config, world, device_type)


def _check_device(config: EngineConfig, world: int, device_type: str) -> None:
    if device_type == "cuda":
        if config.device not in ("auto", "cuda"):
            raise ValueError(f"device {config.device!r}: with tensor_parallel_size > 1 rank r uses cuda:LOCAL_RANK; "
                             "pass device='cuda' (choose GPUs with CUDA_VISIBLE_DEVICES)")
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs; {torch.cuda.device_count()} visible")
    elif device_type != "cpu":
        raise ValueError(f"tensor parallelism runs on cuda (NCCL) or cpu (gloo), not {device_type!r}")


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _pg_options(config: EngineConfig, backend: str):
    """NCCL's CTA limits (the SMs a collective may take from overlapped GEMMs), when set."""
    if backend != "nccl" or config.tp_collective_max_ctas is None:
        return None
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.max_ctas = config.tp_collective_max_ctas
    opts.config.min_ctas = 1
    return opts


def init_groups(config: EngineConfig, rank: int, world: int, local_rank: int, device_type: str,
                store=None) -> TPContext:
    """Joins the default group (env:// rendezvous, or `store` when given) and the control group."""
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    backend = _backend(device_type)
    owns = not dist.is_initialized()
    if owns:
        kwargs = dict(store=store) if store is not None else dict(init_method="env://")
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=config.tp_timeout_s),
                                pg_options=_pg_options(config, backend), **kwargs)
    elif dist.get_world_size() != world:
        raise ValueError(f"torch.distributed is already initialised with {dist.get_world_size()} ranks; "
                         f"tensor_parallel_size is {world}")
    group = dist.group.WORLD
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)  # also beside a gloo data plane
    # Connect both groups now, so a rank that cannot start fails every rank at start-up.
    dist.all_reduce(torch.zeros(1, device=device), group=group)
    dist.barrier(group=control)
    return TPContext(rank, world, local_rank, device, group, control, owns_default_group=owns)


def _join_env_group(config: EngineConfig, world: int, device_type: str) -> TPContext:
    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world:
        raise ValueError(f"WORLD_SIZE is {env_world} (torchrun?) but tensor_parallel_size is {world}: "
                         "they must match")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return init_groups(config, rank, world, local_rank, device_type)


# ---- rank 0 launching the others -------------------------------------------------------------------
class WorkerProcesses:
    """The worker ranks rank 0 started: liveness, and stopping them."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs

    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                raise RuntimeError(f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {code}; "
                                   "its error is above in stderr")

    def stop(self, grace_s: float) -> None:
        """Waits up to grace_s for the workers to exit, then terminates (SIGTERM), then kills them."""
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()


def worker_env(config: EngineConfig, rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    set_nvls_off(env)
    package_root = str(Path(__file__).resolve().parents[2])  # the workers import this nanoflow
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                "RANK": str(rank), "LOCAL_RANK": str(rank), CONFIG_ENV: json.dumps(_config_dict(config)),
                WATCH_ENV: "1"})
    if config.resolved_device().type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores
    return env


def _config_dict(config: EngineConfig) -> dict:
    return dataclasses.asdict(config)


def _launch_workers(config: EngineConfig, world: int, device_type: str) -> TPContext:
    if dist.is_initialized():
        raise ValueError("torch.distributed is already initialised in this process (another tensor-parallel "
                         "engine still running?): shut it down first (engine.shutdown())")
    timeout = timedelta(seconds=config.tp_timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=timeout, wait_for_workers=False)
    procs = [subprocess.Popen([sys.executable, "-m", "nanoflow.distributed.worker"], stdin=subprocess.PIPE,
                              env=worker_env(config, rank, world, store.port))
             for rank in range(1, world)]
    workers = WorkerProcesses(procs)
    try:
        _wait_ready(store, workers, world, config.tp_timeout_s)
        ctx = init_groups(config, 0, world, 0, device_type, store=store)
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    ctx.workers = workers
    return ctx


def _wait_ready(store, workers: WorkerProcesses, world: int, timeout_s: float) -> None:
    """Until every worker has started (each sets its key before joining the group); raises at once
    when one exits first, instead of waiting out the rendezvous timeout."""
    keys = [_READY_KEY.format(r) for r in range(1, world)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        workers.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel workers did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def worker_store(world: int, timeout_s: float):
    """A launched worker's client of rank 0's store (from MASTER_ADDR / MASTER_PORT), marked ready."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False,
                          timeout=timedelta(seconds=timeout_s))
    store.set(_READY_KEY.format(int(os.environ["RANK"])), "1")
    return store


def watch_parent_stdin() -> None:
    """Launched workers: exit as soon as rank 0's process is gone (our stdin pipe closes)."""
    def watch() -> None:
        try:  # os.read: no buffered-reader lock held at interpreter shutdown
            while os.read(0, 1 << 16):
                pass
        except OSError:
            pass
        print(f"[nanoflow tp rank {os.environ.get('RANK')}] rank 0 is gone; exiting", file=sys.stderr, flush=True)
        os._exit(3)
    threading.Thread(target=watch, name="nanoflow-tp-parent-watch", daemon=True).start()
