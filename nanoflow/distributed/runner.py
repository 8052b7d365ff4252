"""The model runner of a tensor-parallel rank.

Rank 0 schedules, builds the batch, and then (TPModelRunner.forward) sends the step to the workers:
a host message with the batch's host-side values and the plan when it changed, then one broadcast
of every batch tensor packed into one int64 tensor. Every rank then runs the same forward (same
plan, same nano-ops, so the same collectives in the same order); the logits are gathered on rank 0,
which samples. Workers (follow) do the same forward without a scheduler, KV manager or sampler:
rank 0's block tables address their KV caches, which have the same number of blocks everywhere.

CUDA graphs are off under tensor parallelism (the collectives run eagerly).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from nanoflow.engine.errors import StepFatalError
from nanoflow.forward_batch import ForwardBatch
from nanoflow.engine.kv_cache import KVCacheManager
from nanoflow.engine.runner import ModelRunner
from nanoflow.models.llama import LlamaForCausalLM, StepState
from nanoflow.pipeline.executor import make_executor
from nanoflow.pipeline.plan import Plan


@dataclass(frozen=True)
class StepMessage:
    """Rank 0 -> workers: one forward step (its tensors follow in one broadcast)."""
    query_start_loc: list[int]
    num_decode: int
    decode_context_tokens: int
    block_table_width: int
    num_logits: int
    run_plan: bool
    """Rank 0's decision: the step runs the plan (else sequentially)."""
    plan: dict | None
    """The plan's JSON when it changed since the last step (None: keep the current one)."""


@dataclass(frozen=True)
class CallsMessage:
    """Rank 0 -> workers: run layer-0 network ops on the workspace, `count` times each, in order
    (the profiler timing collectives, which need every rank)."""
    calls: list[tuple[int, int, int, int]]
    """(op index in the layer, lo, hi, count)."""


_INT_FIELDS = ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "query_start_loc",
               "logits_indices")


def _lengths(m: StepMessage) -> list[int]:
    t, r = m.query_start_loc[-1], len(m.query_start_loc) - 1
    return [t, t, t, r * m.block_table_width, r, r + 1, m.num_logits]


class TPModelRunner(ModelRunner):
    """ModelRunner whose forward runs on every rank of the group (rank 0 drives, workers follow)."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCacheManager, token_budget: int, tp,
                 kv_dtype: torch.dtype | None = None, measured_plan_choice: bool = True):
        super().__init__(model, kv, token_budget, cuda_graphs=False, kv_dtype=kv_dtype,
                         measured_plan_choice=measured_plan_choice)
        self.tp = tp
        self._sent_executor = None
        """Rank 0: the executor whose plan the workers run."""
        self._plans: dict[str, object] = {}
        """Workers: executors by plan JSON."""

    # ---- rank 0 ---------------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch, run_plan: bool | None = None) -> torch.Tensor:
        try:
            self.tp.check_workers()
            timed_key = None
            if run_plan is None:  # decided here, sent to the workers: every rank runs the same plan
                run_plan, timed_key = self.choose_plan(batch)
            plan = None
            if self.executor is not self._sent_executor:
                plan = self.executor.plan.to_dict()
                self._sent_executor = self.executor
            self.tp.send(StepMessage(list(batch.query_start_loc_cpu), batch.num_decode,
                                     batch.decode_context_tokens, batch.block_tables.shape[1],
                                     batch.logits_indices.shape[0], run_plan, plan))
            packed = torch.cat([getattr(batch, f).reshape(-1).to(torch.int64) for f in _INT_FIELDS])
            self.tp.broadcast(packed)
            return self._run(batch, run_plan, timed_key)
        except BaseException as exc:
            # The ranks are out of step (a worker may wait inside a collective, not for a message):
            # stop them now rather than let a later step pair its collectives with the wrong ones.
            self.tp.shutdown(notify=False)
            if isinstance(exc, Exception) and not isinstance(exc, StepFatalError):
                # Without its workers the engine cannot step again: not a failure of one step.
                raise StepFatalError(f"tensor-parallel step failed, workers stopped: {exc}") from exc
            raise

    def share_calls(self, calls: list[tuple[int, int, int, int]]) -> None:
        """Rank 0: the workers run these layer-0 ops too (rank 0 then makes the same calls itself)."""
        self.tp.check_workers()
        self.tp.send(CallsMessage(list(calls)))

    # ---- workers ----------------------------------------------------------------------------------
    def follow(self, message) -> None:
        """Workers: run what rank 0 sent."""
        if isinstance(message, StepMessage):
            self._follow_step(message)
        elif isinstance(message, CallsMessage):
            self._follow_calls(message)
        else:
            raise RuntimeError(f"unexpected message from rank 0: {message!r}")

    def _follow_step(self, m: StepMessage) -> None:
        if m.plan is not None:
            key = json.dumps(m.plan, sort_keys=True)
            if key not in self._plans:
                self._plans[key] = make_executor(Plan.from_dict(m.plan), self.model.layers[0].ops, self.device)
            self.executor = self._plans[key]
        lengths = _lengths(m)
        packed = torch.empty(sum(lengths), dtype=torch.int64, device=self.device)
        self.tp.broadcast(packed)
        parts = dict(zip(_INT_FIELDS, torch.split(packed, lengths)))
        r = len(m.query_start_loc) - 1
        batch = ForwardBatch(
            input_ids=parts["input_ids"], positions=parts["positions"], slot_mapping=parts["slot_mapping"],
            block_tables=parts["block_tables"].view(r, m.block_table_width).to(torch.int32),
            seq_lens=parts["seq_lens"].to(torch.int32), query_start_loc=parts["query_start_loc"].to(torch.int32),
            query_start_loc_cpu=list(m.query_start_loc), num_decode=m.num_decode,
            logits_indices=parts["logits_indices"], decode_context_tokens=m.decode_context_tokens)
        super().forward(batch, m.run_plan)

    @torch.inference_mode()
    def _follow_calls(self, m: CallsMessage) -> None:
        ops = self.model.layers[0].ops
        state = StepState(None, self.workspace, self.kv_caches)
        for index, lo, hi, count in m.calls:
            for _ in range(count):
                ops[index].fn(state, lo, hi)
