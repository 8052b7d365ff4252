"""Model runner: owns the model, the KV-cache tensors and the step workspace; turns a scheduled batch
into device tensors, runs the layers through the pipeline executor, and returns logits."""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

import torch

from nanoflow import memory_check
from nanoflow.forward_batch import ForwardBatch
from nanoflow.engine.input_batch import InputBatch
from nanoflow.engine.kv_cache import KVCacheManager
from nanoflow.engine.scheduler import SchedulerOutput
from nanoflow.models.llama import LlamaForCausalLM, StepState
from nanoflow.pipeline.executor import PlanExecutor, make_executor
from nanoflow.pipeline.graphs import GraphSet
from nanoflow.pipeline.plan_choice import FixedRates, PlanChooser, StepCostModel, StepFeatures
from nanoflow.pipeline.plan_feedback import MeasuredChoice, StepTimer

logger = logging.getLogger(__name__)
MAX_STEP_LOG = 200_000
"""Steps kept in ModelRunner.step_log (a long-lived server keeps the most recent)."""


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one forward ran (bench reports classify steps by it)."""
    num_tokens: int
    num_decode: int
    plan: bool
    """Ran under the (non-sequential) plan."""
    graph: bool
    """Ran on the CUDA-graph buffers (replayed, or issued eagerly on them before its capture)."""


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, kv_dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=kv_dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def choose_num_blocks(model: LlamaForCausalLM, block_size: int, device: torch.device,
                      gpu_memory_utilization: float, cpu_kv_cache_gb: float, max_num_seqs: int,
                      kv_dtype: torch.dtype) -> int:
    per_block = kv_block_bytes(model, block_size, kv_dtype)
    if device.type != "cuda":
        return max(1, int(cpu_kv_cache_gb * (1 << 30)) // per_block)
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    reserve = memory_check.logits_bytes(model.config, max_num_seqs) + memory_check.GPU_ACTIVATION_RESERVE_BYTES
    budget = total * gpu_memory_utilization - used - reserve
    memory_check.check_kv_budget(budget, per_block, device, used, reserve, gpu_memory_utilization)
    return int(budget // per_block)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv: KVCacheManager, token_budget: int,
                 cuda_graphs: bool = False, kv_dtype: torch.dtype | None = None, measured_plan_choice: bool = True):
        self.model = model
        self.kv = kv
        self.device = model.device
        self.block_size = kv.block_size
        cfg = model.config
        shape = (kv.pool.num_blocks, kv.block_size, cfg.num_key_value_heads, cfg.head_dim)
        kv_dtype = kv_dtype or model.dtype
        # One tensor for all layers, so the host tier moves a block of every layer with one gather;
        # each layer's K and V are contiguous views of it, as separate tensors would be.
        self.kv_all = torch.zeros((cfg.num_hidden_layers, 2, *shape), dtype=kv_dtype, device=self.device)
        self.kv_caches = [(self.kv_all[i, 0], self.kv_all[i, 1]) for i in range(cfg.num_hidden_layers)]
        self.workspace = model.new_workspace(token_budget)
        self.executor = make_executor(None, self.model.layers[0].ops, self.device)
        """The plan's executor (LLMEngine.set_plan replaces it)."""
        self.sequential = make_executor(None, self.model.layers[0].ops, self.device)
        # Per-token seconds of KV read and of GEMMs at the fixed ranking rates (see attention_share).
        rates = FixedRates()
        kv_bytes_per_token = kv_block_bytes(model, kv.block_size, kv_dtype) / kv.block_size
        self._attn_s_per_context_token = kv_bytes_per_token / rates.attn_bytes_per_s
        self._gemm_s_per_token = 2 * model.config.num_active_parameters() / rates.gemm_flops_per_s
        self.plan_steps = 0
        """Steps the (non-sequential) plan ran; the others ran sequentially (see PlanChooser)."""
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=MAX_STEP_LOG)
        """One record per forward(), oldest first."""
        self.profile = None
        """The device's profile table (nanoflow tune), or None: per-step plan choice (set_profile)."""
        self._cost: StepCostModel | None = None
        self._chooser: PlanChooser | None = None
        self.measured_plan_choice = measured_plan_choice
        """Predicted plan wins are confirmed by timed steps (EngineConfig.plan_choice 'measured')."""
        self._timer = StepTimer(self.device)
        self.inputs = InputBatch(kv, self.device)
        """Persistent block tables and staging buffers of the step inputs."""
        self.graphs: GraphSet | None = None
        if cuda_graphs and self.device.type == "cuda":
            max_blocks = min(kv.pool.num_blocks, -(-cfg.max_position_embeddings // kv.block_size))
            self.graphs = GraphSet(model, self.workspace, self.kv_caches, kv.block_size, max_blocks)

    def set_profile(self, table) -> None:
        """Per-step plan choice from this profile (None: the fixed rates and min_attn_share). A table
        that does not fit the model is refused with a warning (the fixed rates are used)."""
        self._chooser = None
        self._cost = None
        self.profile = table
        if table is None:
            return
        try:
            self._cost = StepCostModel(table, self.model.layers[0].ops, len(self.model.layers))
        except ValueError as exc:
            logger.warning("profile not used for plan choice: %s", exc)
            self.profile = None

    def prepare_graphs(self) -> None:
        """Captures the common graph shapes of the current plan and of the sequential fallback
        (nothing without CUDA graphs). Call when no step is in flight (LLMEngine.set_plan)."""
        if self.graphs is None:
            return
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(self.device)[0]
        for ex in [self.executor] if self.executor.is_sequential() else [self.executor, self.sequential]:
            self.graphs.prepare(ex)
        self.graphs.stats["prepare_s"] = self.graphs.stats.get("prepare_s", 0.0) + time.perf_counter() - t0
        self.graphs.stats["prepare_device_bytes"] = self.graphs.stats.get("prepare_device_bytes", 0) + \
            free0 - torch.cuda.mem_get_info(self.device)[0]
        logger.info("CUDA graphs ready in %.1f s: %s", time.perf_counter() - t0, self.graphs.describe())

    def build_batch(self, sched: SchedulerOutput, prev_tokens: torch.Tensor | None = None) -> ForwardBatch:
        """The step's device tensors from the persistent input batch (engine/input_batch.py).

        Async scheduling: a request whose last token is still on the device (a PENDING_TOKEN
        placeholder) takes it from prev_tokens, the tokens sampled by the previous batch built here."""
        return self.inputs.prepare(sched, prev_tokens)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, run_plan: bool | None = None) -> torch.Tensor:
        """Runs the model on the batch; returns fp32 logits of the rows in batch.logits_indices.
        A non-sequential plan runs on the steps its chooser picks (choose_plan), or as run_plan says
        when given. With CUDA graphs the step replays its shape's graph (pipeline/graphs.py)."""
        timed_key = None
        if run_plan is None:
            run_plan, timed_key = self.choose_plan(batch)
        return self._run(batch, run_plan, timed_key)

    def choose_plan(self, batch: ForwardBatch) -> tuple[bool, tuple | None]:
        """Whether the step runs the (non-sequential) plan: predicted from the profile (or the fixed
        rates and min_attn_share) and, with measured plan choice, confirmed by timed steps; and the
        decision bucket to time the step under (None: untimed)."""
        for (key, ran_plan, work), ms in self._timer.done():
            if self._chooser is not None and self._chooser.measured is not None:
                self._chooser.measured.record(key, ran_plan, ms, work)
        if self.executor.is_sequential():
            return False, None
        chooser = self._plan_chooser(self.executor)
        return chooser.runs_plan(batch), chooser.last_key if chooser.measured is not None else None

    def _run(self, batch: ForwardBatch, run_plan: bool, timed_key: tuple | None) -> torch.Tensor:
        executor = self.executor
        ran_plan = run_plan and not executor.is_sequential()
        if ran_plan:
            self.plan_steps += 1
        elif not executor.is_sequential():
            executor = self.sequential
        started = self._timer.start() if timed_key is not None else None
        state = StepState(batch, self.workspace, self.kv_caches)
        graph = self.graphs is not None and not executor.record_timeline and self.graphs.can_run(executor, batch)
        if graph:
            self.graphs.run(executor, batch)
        else:
            self.model.embed(state)
            executor.run([layer.ops for layer in self.model.layers], state)
        if timed_key is not None:
            self._timer.stop(started, (timed_key, ran_plan, self.step_work(batch)))
        self.step_log.append(StepRecord(batch.num_tokens, batch.num_decode, ran_plan, graph))
        return self.model.compute_logits(state)

    def _plan_chooser(self, executor: PlanExecutor) -> PlanChooser:
        if self._chooser is None or self._chooser.executor is not executor:
            measured = MeasuredChoice() if self.measured_plan_choice else None
            self._chooser = PlanChooser(executor, self._cost, self.attention_share, measured)
        return self._chooser

    def plan_choice_summary(self) -> dict | None:
        """What measured plan choice saw (MeasuredChoice.summary), or None."""
        if self._chooser is None or self._chooser.measured is None:
            return None
        return self._chooser.measured.summary()

    def step_work(self, batch: ForwardBatch) -> float:
        """The step's seconds of decode-attention KV reads and GEMMs at the fixed rates: the unit that
        makes timed steps of one decision bucket comparable."""
        return batch.decode_context_tokens * self._attn_s_per_context_token + \
            batch.num_tokens * self._gemm_s_per_token

    @torch.inference_mode()
    def logits_of_rows(self, batch: ForwardBatch, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits of other rows of the batch forward() just ran (prompt logprobs); the workspace
        holds their hidden states until the next forward()."""
        state = StepState(dataclasses.replace(batch, logits_indices=rows), self.workspace, self.kv_caches)
        return self.model.compute_logits(state)

    def attention_share(self, batch: ForwardBatch) -> float:
        """Estimated share of decode attention in the step's decode attention + GEMM time: from the
        profile's op times when set_profile gave one, else at the fixed rates (FixedRates)."""
        if self._cost is not None:
            return self._cost.attention_share(StepFeatures(batch.num_tokens, batch.num_decode,
                                                           batch.decode_context_tokens))
        attn = batch.decode_context_tokens * self._attn_s_per_context_token
        gemm = batch.num_tokens * self._gemm_s_per_token
        return attn / (attn + gemm) if attn + gemm > 0 else 0.0
