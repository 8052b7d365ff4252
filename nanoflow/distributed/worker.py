"""A worker rank (rank > 0): builds its shard of the model and its KV cache, then runs what rank 0
sends until the stop message.

    python -m nanoflow.distributed.worker     # started by rank 0 (nanoflow.distributed.launch)

Under torchrun the worker ranks get here from LLMEngine(...) instead (launch.start).
"""
from __future__ import annotations

import json
import os
import signal
import sys

from nanoflow.config import EngineConfig
from nanoflow.distributed.context import TPContext


def build_runner(config: EngineConfig, ctx: TPContext):
    """This rank's model shard and runner, set up as rank 0's LLMEngine sets up its own (same dtype,
    kernels, token budget; the KV block count agreed with every rank)."""
    from nanoflow.distributed.runner import TPModelRunner
    from nanoflow.engine.kv_cache import KVCacheManager
    from nanoflow.engine.runner import choose_num_blocks
    from nanoflow.models.loader import load_model, resolve_model_source

    source = resolve_model_source(config)
    dtype = config.resolved_dtype(ctx.device, source.model_config.torch_dtype)
    model, _ = load_model(config, ctx.device, dtype, source, tp=ctx)
    token_budget = config.resolved_token_budget(ctx.device)
    kv_dtype = config.resolved_kv_dtype(model.dtype)
    num_blocks = config.num_kv_blocks or choose_num_blocks(
        model, config.block_size, ctx.device, config.gpu_memory_utilization, config.cpu_kv_cache_gb,
        config.max_num_seqs, kv_dtype)
    num_blocks = ctx.agree_min(num_blocks)
    return TPModelRunner(model, KVCacheManager(num_blocks, config.block_size), token_budget, ctx, kv_dtype=kv_dtype)


def serve(config: EngineConfig, ctx: TPContext) -> int:
    """Follows rank 0 until it says stop; 0 then. Errors propagate: the process exits non-zero, and
    rank 0's next collective fails (its check before every step reports the exit)."""
    from nanoflow.distributed.launch import STOP
    runner = build_runner(config, ctx)
    while True:
        message = ctx.receive()
        if message == STOP:
            ctx.shutdown()
            return 0
        runner.follow(message)


def main() -> int:
    from nanoflow.distributed import launch
    # Ctrl-C in a terminal reaches the whole process group: rank 0 handles it and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.environ.get(launch.WATCH_ENV):
        launch.watch_parent_stdin()
    config = EngineConfig(**json.loads(os.environ[launch.CONFIG_ENV]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = launch.worker_store(world, config.tp_timeout_s)
    ctx = launch.init_groups(config, rank, world, int(os.environ["LOCAL_RANK"]),
                             config.resolved_device().type, store=store)
    return serve(config, ctx)


if __name__ == "__main__":
    sys.exit(main())
