"""TPContext: one rank's view of its tensor-parallel group, and the collectives the model calls.

Two process groups: `group` carries the model's tensors (NCCL on CUDA, gloo on CPU): the layers'
all-reduces, the vocab-parallel embedding's all-reduce, the logits gather and each step's batch
tensors; `control` (gloo, on the host) carries rank 0's messages (a step's host-side values, the
plan, stop). A worker waits for its next message on `control`, which has no practical timeout, so an
idle server does not time its workers out; when rank 0's process ends its sockets close and a
waiting worker fails at once. `group` has EngineConfig.tp_timeout_s: a rank that stops answering in
the middle of a step fails the others after that long.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanoflow.distributed.sharding import (ShardLayout, WeightSharder, iter_sharded_safetensors, shard_config,
                                           vocab_shard_rows)
from nanoflow.models.config import ModelConfig

_STOP_GRACE_S = 10.0
"""How long rank 0 waits for stopped workers to exit before terminating them."""


@dataclass
class TPContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: Any
    """Data-plane process group (NCCL on CUDA, gloo on CPU)."""
    control: Any
    """Host-side gloo group for rank 0's messages."""
    workers: Any = None
    """Rank 0 when it launched the workers itself: their processes (nanoflow.distributed.launch)."""
    owns_default_group: bool = True
    """Whether shutdown destroys torch.distributed's default group (not when the caller made it)."""
    _closed: bool = field(default=False, repr=False)

    @property
    def is_driver(self) -> bool:
        """Rank 0: runs the scheduler, samples, talks to the user."""
        return self.rank == 0

    # ---- the model's shape on this rank -----------------------------------------------------------
    def shard_config(self, cfg: ModelConfig) -> ModelConfig:
        return shard_config(cfg, self.world_size)

    def layout(self, cfg: ModelConfig) -> ShardLayout:
        return ShardLayout(cfg, self.rank, self.world_size)

    def vocab_rows(self, vocab_size: int) -> int:
        """Rows of the embedding / LM head on each rank."""
        return vocab_shard_rows(vocab_size, self.world_size)

    def read_weights(self, weights_dir: Path, cfg: ModelConfig):
        """This rank's slices of a safetensors checkpoint of the model `cfg` (the whole model's shape)."""
        return iter_sharded_safetensors(weights_dir, WeightSharder(self.layout(cfg)))

    # ---- collectives the model calls --------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum over the ranks, in place (row-parallel outputs: every rank's partial sum)."""
        dist.all_reduce(t, group=self.group)

    def embed(self, weight: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Vocab-parallel embedding: each rank looks up the ids in its rows (zeros elsewhere), then the
        all-reduce sums them (exact: one rank contributes each row)."""
        start = self.rank * weight.shape[0]
        local = ids - start
        outside = (local < 0) | (local >= weight.shape[0])
        torch.index_select(weight, 0, local.masked_fill(outside, 0), out=out)
        out.masked_fill_(outside.unsqueeze(1), 0)
        self.all_reduce(out)

    def gather_logits(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Rank 0: the [S, vocab_size] fp32 logits from every rank's vocabulary slice; others: None."""
        rows = local.shape[0]
        if rows == 0:  # no request samples this step (every rank knows it from the batch)
            return local.new_empty(0, vocab_size).float() if self.is_driver else None
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.is_driver else None
        dist.gather(local, parts, dst=0, group=self.group)
        if not self.is_driver:
            return None
        return torch.cat(parts, dim=1)[:, :vocab_size].float()

    # ---- rank 0 -> workers -------------------------------------------------------------------------
    def send(self, message: Any) -> None:
        """Rank 0: a host-side message (pickled) to every worker."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> Any:
        """Workers: the next message of rank 0 (waits as long as rank 0 lives)."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def broadcast(self, t: torch.Tensor) -> None:
        """Rank 0's tensor into every rank's `t` (same shape and dtype everywhere)."""
        dist.broadcast(t, src=0, group=self.group)

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV blocks that fit on every GPU)."""
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def check_workers(self) -> None:
        """Rank 0: RuntimeError if the group was shut down or a worker process it launched has exited."""
        if self._closed:
            raise RuntimeError("the tensor-parallel group is shut down (engine.shutdown(), or an error in an "
                               "earlier step): build a new engine")
        if self.workers is not None:
            self.workers.check_alive()

    # ---- the end ------------------------------------------------------------------------------------
    def shutdown(self, notify: bool = True) -> None:
        """Rank 0: tells the workers to stop (notify: they wait for a message, i.e. no step failed
        half-way; a message would block behind a collective otherwise), leaves the process groups, and
        waits a few seconds for the workers it launched (none after a failed step), then terminates
        and kills what is left. Workers it did not launch (torchrun) fail after tp_timeout_s, or
        torchrun stops them when rank 0 exits. Workers: leave the process groups. Idempotent."""
        if self._closed:
            return
        self._closed = True
        from nanoflow.distributed.launch import STOP
        if self.is_driver and notify:
            try:
                self.send(STOP)
            except Exception:  # noqa: BLE001 - a worker already gone: its process is reaped below
                pass
        try:
            if self.owns_default_group and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone; nothing left to release
            pass
        self.group = self.control = None
        if self.workers is not None:  # after a failed step they may sit in a collective: no grace
            self.workers.stop(grace_s=_STOP_GRACE_S if notify else 0.0)
