"""LLMEngine: add requests, step the dense batch, collect outputs.

One step = schedule (CPU) -> forward + sample (device) -> update requests (CPU). Not thread-safe:
one thread calls add_request / abort_request / step (the server runs them on its engine thread)."""
from __future__ import annotations

import itertools
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

from nanoflow.config import EngineConfig
from nanoflow.engine.detokenizer import IncrementalDetokenizer, check_stop_token
from nanoflow.engine.errors import StepFatalError
from nanoflow.engine import prompt_logprobs as prompt_lp
from nanoflow.engine.kv_cache import KVCacheManager
from nanoflow.engine.kv_disk_tier import DiskKVTier
from nanoflow.engine.kv_host_tier import HostKVTier
from nanoflow.engine.request import PENDING_TOKEN, Request, RequestStatus
from nanoflow.engine.runner import ModelRunner, choose_num_blocks
from nanoflow.engine.sampler import Sampler, SamplingBatch, make_generator
from nanoflow.engine.scheduler import Scheduler, SchedulerConfig
from nanoflow.models.loader import load_model, load_tokenizer, resolve_model_source
from nanoflow.pipeline.executor import make_executor
from nanoflow.pipeline.plan_cache import lookup_profile, resolve_plan
from nanoflow.outputs import CompletionOutput, KnownPrefix, Logprob, RequestOutput
from nanoflow.sampling_params import SamplingParams


logger = logging.getLogger(__name__)
_MAX_STEP_RECORDS = 1_000_000
# A failing step fails only its requests; this many failing steps in a row (or a device error, after
# which CUDA refuses all work) mean the engine itself is broken: step() raises EngineFatalError.
_MAX_CONSECUTIVE_STEP_FAILURES = 3
_DEVICE_ERRORS = (StepFatalError,) + tuple(t for t in (getattr(torch, "AcceleratorError", None),) if t is not None)


def _start_tensor_parallel(config: EngineConfig, source):
    """The TPContext of rank 0 (workers launched or joined) when tensor_parallel_size > 1, else None."""
    if config.tensor_parallel_size == 1:
        return None
    from nanoflow.distributed.launch import start
    return start(config, source.model_config)


class QueueFullError(RuntimeError):
    """The waiting queue is at EngineConfig.max_waiting_requests; retry later."""


class PromptError(ValueError):
    """A prompt the engine refuses. `param` names the request field at fault and `code` is the
    OpenAI error code, so the server answers 400 with exactly this message."""

    def __init__(self, message: str, param: str = "prompt", code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


class EngineFatalError(RuntimeError):
    """The engine cannot go on (device error, or steps keep failing); restart the process."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    last_step_time_s: float
    num_steps: int
    plan_steps: int = 0
    """Steps run under the (non-sequential) plan; the others ran sequentially (Plan.min_attn_share)."""
    prefix_cache_queries: int = 0
    """Tokens looked up in the prefix cache at admission (a counter, as vLLM's)."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached (device or host tier)."""
    prefix_cache_host_hits: int = 0
    """Of the hits, tokens copied back from the host tier."""
    kv_blocks_cached: int = 0
    """Device blocks holding a reusable prefix (free or in use)."""
    kv_host_blocks_used: int = 0
    """Host-tier slots holding a block."""
    kv_host_blocks_total: int = 0
    """Host-tier slots (0: no host tier)."""
    kv_host_blocks_saved: int = 0
    """Blocks copied to the host tier so far."""
    kv_host_blocks_loaded: int = 0
    """Blocks copied back from the host tier so far (disk-tier hits included)."""
    prefix_cache_disk_hits: int = 0
    """Of the hits, tokens read back from the disk tier (not in prefix_cache_host_hits)."""
    kv_disk_blocks_used: int = 0
    """Disk-tier slots holding a block."""
    kv_disk_blocks_total: int = 0
    """Disk-tier slots (0: no disk tier)."""
    kv_disk_blocks_written: int = 0
    """Blocks written to the disk tier so far."""
    kv_disk_blocks_read: int = 0
    """Blocks read back from the disk tier so far."""
    tokens_computed: int = 0
    """Tokens fed through the model so far (prefill and decode)."""
    prefill_tokens_computed: int = 0
    """Of those, tokens at prompt positions (what prefix caching saves)."""
    num_preemptions: int = 0
    """Requests preempted so far."""


@dataclass
class _SeqState:
    """Engine-side extras of one sequence."""
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    prompt_logprobs: prompt_lp.PromptLogprobState | None = None


@dataclass
class _InFlight:
    """A launched step whose sampled tokens the host has not read yet."""
    sampling: list[Request]
    token_ids: torch.Tensor
    tokens_host: torch.Tensor
    logprobs_host: torch.Tensor | None
    top_logprobs_host: torch.Tensor | None
    top_ids_host: torch.Tensor | None
    event: torch.cuda.Event | None = None
    prompt_chunks: list[prompt_lp.PromptLogprobChunk] = field(default_factory=list)


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Starts a device-to-host copy into pinned memory without waiting for it."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


@dataclass
class _Group:
    """A user request: its n sequences."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, stream_text: bool = True):
        """stream_text: step() returns every advanced request with its text current (for streaming);
        otherwise it returns finished requests only, their text decoded once at the end (cheaper for
        offline batches; stop strings are still checked token by token)."""
        self.config = config or EngineConfig()
        self.stream_text = stream_text
        source = resolve_model_source(self.config)
        self.tp = _start_tensor_parallel(self.config, source)  # None on one rank; torchrun's ranks > 0 stay inside
        if self.tp is not None:
            weakref.finalize(self, self.tp.shutdown)
        self.device = self.config.resolved_device() if self.tp is None else self.tp.device
        dtype = self.config.resolved_dtype(self.device, source.model_config.torch_dtype)
        self.model, self.source = load_model(self.config, self.device, dtype, source, tp=self.tp)
        self.model_config = self.source.model_config
        self.tokenizer = load_tokenizer(self.source)
        self.max_model_len = self.config.max_model_len or self.model_config.max_position_embeddings
        self.eos_token_ids = self._eos_ids()
        token_budget = self.config.resolved_token_budget(self.device)
        kv_dtype = self.config.resolved_kv_dtype(self.model.dtype)
        num_blocks = self.config.num_kv_blocks or choose_num_blocks(
            self.model, self.config.block_size, self.device, self.config.gpu_memory_utilization,
            self.config.cpu_kv_cache_gb, self.config.max_num_seqs, kv_dtype)
        if self.tp is not None:  # every rank allocates the same blocks: what fits on all of them
            num_blocks = self.tp.agree_min(num_blocks)
        self.kv = KVCacheManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(token_budget, self.config.max_num_seqs, self.config.kv_admission_ratio,
                            kv_admission=self.config.kv_admission), self.kv)
        # The torch reference kernels sync with the host (not graph_safe): graphs need the Triton set.
        graphs = not self.config.enforce_eager and self.model.kernels.graph_safe
        if self.tp is None:
            self.runner = ModelRunner(self.model, self.kv, token_budget, cuda_graphs=graphs, kv_dtype=kv_dtype,
                                      measured_plan_choice=config.plan_choice == "measured")
        else:  # rank 0 of a tensor-parallel group: each step also runs on the worker ranks
            from nanoflow.distributed.runner import TPModelRunner
            self.runner = TPModelRunner(self.model, self.kv, token_budget, self.tp, kv_dtype=kv_dtype,
                                        measured_plan_choice=config.plan_choice == "measured")
        if self.config.kv_host_gb > 0:
            if self.tp is not None:  # the worker ranks follow rank 0's block tables, not its host copies
                raise ValueError("kv_host_gb (the host KV tier) does not work with tensor_parallel_size > 1 yet")
            slots = HostKVTier.slots_for_bytes(self.runner.kv_all, self.config.kv_host_gb * (1 << 30))
            if slots == 0:
                raise ValueError(f"kv_host_gb {self.config.kv_host_gb} holds no KV block")
            self.kv.attach_host_tier(HostKVTier(self.runner.kv_all, slots))
            if self.config.kv_disk_gb > 0:
                disk_slots = DiskKVTier.slots_for_bytes(self.kv.host, self.config.kv_disk_gb * (1 << 30))
                if disk_slots == 0:
                    raise ValueError(f"kv_disk_gb {self.config.kv_disk_gb} holds no KV block")
                self.kv.attach_disk_tier(DiskKVTier(self.kv.host, disk_slots, self.config.kv_disk_dir))
        self._executors: dict[str, object] = {}
        self.set_plan(self.config.plan)
        self.sampler = Sampler(self.eos_token_ids, seed=self.config.seed)
        self._groups: dict[str, _Group] = {}
        self._arrivals = itertools.count()
        self._inflight: _InFlight | None = None
        self._consecutive_step_failures = 0
        self._gpu_timeline: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        self.step_times: list[tuple[float, float, int]] = []
        """(start_s, end_s, num_tokens) of every step, for benchmarks."""

    def shutdown(self) -> None:
        """Stops the tensor-parallel worker ranks and leaves their process group, and deletes the disk
        tier's file (also done at garbage collection and interpreter exit). The engine cannot step afterwards."""
        if self.tp is not None:
            self.tp.shutdown()
        if self.kv.disk is not None:
            self.kv.disk.close()

    def _eos_ids(self) -> list[int]:
        ids = list(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def set_plan(self, spec: str) -> None:
        """Switch the pipeline plan ('sequential', a built-in name, a JSON file, or 'auto')."""
        if spec not in self._executors:
            plan = resolve_plan(spec, self)
            self._executors[spec] = make_executor(plan, self.model.layers[0].ops, self.device)
        self.runner.executor = self._executors[spec]
        self.plan_name = self.runner.executor.name
        if not self.runner.executor.is_sequential() and self.runner.profile is None:
            self.runner.set_profile(lookup_profile(self))
        self.runner.prepare_graphs()

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.n > self.config.max_seqs_per_request:
            raise ValueError(f"n must be at most {self.config.max_seqs_per_request} (the server's "
                             f"max_seqs_per_request), got {params.n}")
        if len(self.scheduler.waiting) + params.n > self.config.max_waiting_requests:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting_requests} requests)")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.validate_prompt(ids)
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        group = _Group(request_id, text, ids)
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seq = Request(seq_id, ids, params, max_tokens, next(self._arrivals))
            seed = None if params.seed is None else params.seed + i
            detok = IncrementalDetokenizer(self.tokenizer, ids, params) if (self.stream_text or params.stop) else None
            seq.engine_state = _SeqState(
                detokenizer=detok,
                generator=None if seed is None else make_generator(seed, self.device),
                logprobs=[] if params.logprobs is not None else None,
                prompt_logprobs=prompt_lp.PromptLogprobState([None]) if params.prompt_logprobs is not None
                else None)
            group.seqs.append(seq)
        capacity = self.kv.pool.num_blocks * self.kv.block_size
        if len(ids) + max_tokens > capacity:
            raise ValueError(f"request needs {len(ids) + max_tokens} tokens of KV cache; the cache holds "
                             f"{capacity}: lower max_tokens")
        self._groups[request_id] = group
        for seq in group.seqs:
            self.scheduler.add(seq)

    def validate_prompt(self, ids: list[int], max_tokens: int | None = None, param: str = "prompt") -> None:
        """Raises PromptError unless `ids` is a prompt this engine can serve: not empty, every id in
        the vocabulary, and shorter than max_model_len (room for one output token). With max_tokens
        (> 0), prompt + max_tokens must fit max_model_len too (add_request instead clamps max_tokens
        to the room left). `param` is the request field holding the prompt, named in the empty and
        out-of-vocabulary errors. The one prompt check: the server calls it before add_request does.
        Reads only fixed configuration, so any thread may call it."""
        if not ids:
            raise PromptError(f"{param} must not be empty", param=param)
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:  # C-speed scan first: prompts can be long
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise PromptError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param=param)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise PromptError(f"This model's maximum context length is {limit} tokens. However, your "
                              f"prompt has {len(ids)} tokens, leaving no room for output. Please shorten "
                              "the prompt.", param="prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > 0 and len(ids) + max_tokens > limit:
            raise PromptError(f"This model's maximum context length is {limit} tokens. However, you "
                              f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                              f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                              param="max_tokens", code="context_length_exceeded")

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.seqs:
            if not seq.status.finished:
                self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)
            seq.num_pending_tokens = 0  # an in-flight token of an aborted request is dropped

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and launches the next dense batch, then finishes the previous one (async
        scheduling: the CPU forms step i+1 while the device runs step i; a request that stopped in
        step i is retired after step i+1 was formed, so at most one step late)."""
        outputs: list[RequestOutput] = []
        if self._inflight is not None and not self._can_overlap():
            outputs += self._process(self._inflight)
            self._inflight = None
        sched = self.scheduler.schedule()
        try:
            launched = self._launch(sched)
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine goes on
            self._step_failed(exc, "launching")
            launched = None
            outputs += self._fail_groups([r for r, _ in sched.scheduled])
        else:
            self._consecutive_step_failures = 0
        if self._inflight is not None:
            outputs += self._process(self._inflight)
        self._inflight = launched
        if launched is not None and not self.config.async_scheduling:
            outputs += self._process(launched)
            self._inflight = None
        return outputs

    def _step_failed(self, exc: Exception, what: str) -> None:
        """Logs a failed step; raises EngineFatalError when the engine cannot go on."""
        self._consecutive_step_failures += 1
        if isinstance(exc, _DEVICE_ERRORS) or self._consecutive_step_failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineFatalError(f"engine step failed while {what} ({self._consecutive_step_failures} "
                                   f"in a row): {type(exc).__name__}: {exc}") from exc
        logger.exception("engine step failed while %s; its requests end with finish reason 'error'", what)

    def _fail_groups(self, seqs: list[Request]) -> list[RequestOutput]:
        """Fails the user requests of `seqs` (all their sequences: finish reason 'error', KV freed)."""
        groups = {}
        for seq in seqs:
            group = self._groups.get(self._parent_id(seq))
            if group is not None:
                groups[group.request_id] = group
        for group in groups.values():
            for seq in group.seqs:
                self._fail_seq(seq)
        # Blocks the failed step wrote may hold bad KV: no later request may hit them as a cached prefix.
        self.kv.reset_prefix_cache()
        return [self._make_output(g) for g in groups.values()]

    def _fail_seq(self, seq: Request) -> None:
        if seq.status.finished and not seq.num_pending_tokens:
            return  # it ended before the failure: keep its result
        if not seq.status.finished:
            self.scheduler.finish(seq, RequestStatus.FINISHED_ERROR)
        seq.status = RequestStatus.FINISHED_ERROR
        # Placeholders of tokens still in flight are not output.
        num_known = len(seq.output_token_ids) - seq.num_pending_tokens
        del seq.output_token_ids[num_known:]
        seq.num_pending_tokens = 0
        st: _SeqState = seq.engine_state
        if st.logprobs is not None:
            del st.logprobs[len(seq.output_token_ids):]

    def _can_overlap(self) -> bool:
        # Penalties need every earlier token on the host, so those steps run synchronously.
        return self.config.async_scheduling and not any(
            r.params.needs_penalties for r in self.scheduler.running)

    def _launch(self, sched) -> _InFlight | None:
        if not sched.scheduled:  # no batch to build: the retired requests' input rows go back now
            self.runner.inputs.release([*sched.finished, *sched.preempted])
            return None
        start = time.perf_counter()
        gpu_start = self._record_event()
        prev = self._inflight
        batch = self.runner.build_batch(sched, prev.token_ids if prev is not None else None)
        logits = self.runner.forward(batch)
        sampling = [r for r, n in sched.scheduled if r.num_computed_tokens + n == r.num_tokens]
        out = self.sampler(logits, SamplingBatch(
            params=[r.params for r in sampling],
            prompt_token_ids=[r.prompt_token_ids for r in sampling],
            output_token_ids=[r.output_token_ids for r in sampling],
            generators=[r.engine_state.generator for r in sampling]))
        flight = _InFlight(sampling, out.token_ids, *[_to_host(t) for t in (
            out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids)])
        plans = prompt_lp.plan_rows(sched.scheduled, batch)
        if plans:
            flight.prompt_chunks = prompt_lp.compute(self.runner, batch, plans, _to_host)
        flight.event = self._record_event(always=True)
        if gpu_start is not None:
            self._gpu_timeline.append((gpu_start, flight.event))
        for r, n in sched.scheduled:
            r.num_computed_tokens += n
        for r in sampling:
            r.output_token_ids.append(PENDING_TOKEN)
            r.num_pending_tokens += 1
            if len(r.output_token_ids) >= r.max_tokens:  # known now: stop scheduling it
                self.scheduler.finish(r, RequestStatus.FINISHED_LENGTH)
        self.step_times.append((start, time.perf_counter(), sched.num_tokens))
        if len(self.step_times) > _MAX_STEP_RECORDS:  # a long-lived server: keep the recent half
            del self.step_times[:_MAX_STEP_RECORDS // 2]
        return flight

    def _process(self, flight: _InFlight) -> list[RequestOutput]:
        try:
            if flight.event is not None:
                flight.event.synchronize()
            tokens = flight.tokens_host.tolist()
            lp = flight.logprobs_host.tolist() if flight.logprobs_host is not None else None
            top_lp = flight.top_logprobs_host.tolist() if flight.top_logprobs_host is not None else None
            top_ids = flight.top_ids_host.tolist() if flight.top_ids_host is not None else None
        except Exception as exc:  # noqa: BLE001 - the step's results are lost: fail its requests
            self._step_failed(exc, "reading its results")
            return self._fail_groups([*flight.sampling, *(c.seq for c in flight.prompt_chunks)])
        failed: list[Request] = []
        for chunk in flight.prompt_chunks:
            if not chunk.seq.status.finished or chunk.seq.num_pending_tokens:
                try:
                    prompt_lp.accept(chunk)
                except Exception:  # noqa: BLE001 - this request fails alone
                    logger.exception("prompt logprobs of %s failed", chunk.seq.request_id)
                    failed.append(chunk.seq)
        touched: dict[str, _Group] = {}
        for row, (seq, token) in enumerate(zip(flight.sampling, tokens)):
            if seq.num_pending_tokens == 0:  # stopped or aborted after this step was launched
                continue
            try:
                self._accept_token(seq, token, row, lp, top_lp, top_ids)
            except Exception:  # noqa: BLE001 - this request fails alone; the others go on
                logger.exception("accepting a token of %s failed", seq.request_id)
                failed.append(seq)
                continue
            parent = self._parent_id(seq)
            if parent in self._groups:
                touched[parent] = self._groups[parent]
        outputs = self._fail_groups(failed) if failed else []
        # Offline callers read only finished requests: skip copying every running request's tokens.
        return outputs + [self._make_output(g) for g in touched.values()
                          if g.request_id in self._groups and (self.stream_text or self._done(g))]

    def _accept_token(self, seq: Request, token: int, row: int, chosen_lp, top_lp, top_ids) -> None:
        st: _SeqState = seq.engine_state
        num_out = len(seq.output_token_ids) - seq.num_pending_tokens + 1
        seq.output_token_ids[num_out - 1] = token
        seq.num_pending_tokens -= 1
        if st.logprobs is not None:
            k = seq.params.logprobs or 0
            entry = {token: Logprob(chosen_lp[row])}
            # top_ids is None when no row of the step asked for k > 0.
            for rank, (tid, lp) in enumerate(zip(top_ids[row][:k], top_lp[row][:k]) if k else (), start=1):
                if tid == token:
                    entry[token].rank = rank
                else:
                    entry[tid] = Logprob(lp, rank)
            st.logprobs.append(entry)
            st.cumulative_logprob += chosen_lp[row]
        stop_by_token = check_stop_token(token, seq.params, self.eos_token_ids, num_out)
        stop_str = st.detokenizer.append([token], stopped_by_token=stop_by_token is not None) \
            if st.detokenizer is not None else None
        if stop_by_token is None and stop_str is None:
            return
        seq.stop_reason = stop_str if stop_str is not None else (
            token if token in seq.params.stop_token_ids else None)
        if not seq.status.finished:
            self.scheduler.finish(seq, RequestStatus.FINISHED_STOPPED)
        seq.status = RequestStatus.FINISHED_STOPPED  # also when its length ran out at this token
        # Tokens sampled after the stop (already launched) are dropped.
        del seq.output_token_ids[num_out:]
        seq.num_pending_tokens = 0

    @staticmethod
    def _parent_id(seq: Request) -> str:
        return seq.request_id.rsplit("#", 1)[0] if seq.params.n > 1 else seq.request_id

    @staticmethod
    def _done(group: _Group) -> bool:
        return all(s.status.finished and not s.num_pending_tokens for s in group.seqs)

    def _make_output(self, group: _Group) -> RequestOutput:
        outputs = []
        prompt_logprobs = None
        for i, seq in enumerate(group.seqs):
            st: _SeqState = seq.engine_state
            if prompt_logprobs is None and st.prompt_logprobs is not None \
                    and st.prompt_logprobs.complete(seq.num_prompt_tokens):
                prompt_logprobs = st.prompt_logprobs.entries  # complete: never changes again
            finished = seq.status.finished and not seq.num_pending_tokens
            if st.detokenizer is not None:
                text = st.detokenizer.output_text if finished else st.detokenizer.visible_text
            elif finished:
                text = self._decode_final(seq)
            else:
                text = ""
            # Only tokens the host has read: not the PENDING_TOKEN placeholders of a step in flight
            # (streaming diffs these lists, so they must grow in step with the logprobs).
            # A running sequence's known tokens never change again: a view, not a copy per step.
            num_known = len(seq.output_token_ids) - seq.num_pending_tokens
            prefix = (lambda items: items[:num_known]) if finished else (lambda items: KnownPrefix(items, num_known))
            outputs.append(CompletionOutput(
                index=i, text=text, token_ids=prefix(seq.output_token_ids),
                cumulative_logprob=st.cumulative_logprob if st.logprobs is not None else None,
                logprobs=prefix(st.logprobs) if st.logprobs is not None else None,
                finish_reason=seq.status.value if finished else None, stop_reason=seq.stop_reason))
        done = self._done(group)
        if done:
            self._groups.pop(group.request_id, None)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outputs, done,
                             prompt_logprobs=prompt_logprobs)

    def _decode_final(self, seq: Request) -> str:
        ids = seq.output_token_ids
        if seq.status == RequestStatus.FINISHED_STOPPED and not seq.params.include_stop_str_in_output \
                and ids and (ids[-1] in self.eos_token_ids or ids[-1] in seq.params.stop_token_ids):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _record_event(self, always: bool = False) -> torch.cuda.Event | None:
        if self.device.type != "cuda" or (self._gpu_timeline is None and not always):
            return None
        event = torch.cuda.Event(enable_timing=self._gpu_timeline is not None)
        event.record()
        return event

    def start_gpu_timeline(self) -> None:
        """Record a device event around every step from now on (benchmarks: GPU idle between steps)."""
        self._gpu_timeline = []

    def gpu_step_ms(self) -> list[float]:
        """Device time of each step on the recorded timeline (its start event to its end event)."""
        if not self._gpu_timeline:
            return []
        torch.cuda.synchronize(self.device)
        return [a.elapsed_time(b) for a, b in self._gpu_timeline]

    def gpu_idle_stats(self) -> dict | None:
        """Device time inside steps vs. idle between consecutive steps, over the recorded timeline."""
        if not self._gpu_timeline:
            return None
        torch.cuda.synchronize(self.device)
        events = self._gpu_timeline
        busy = sum(a.elapsed_time(b) for a, b in events)
        idle = sum(max(0.0, prev[1].elapsed_time(cur[0])) for prev, cur in zip(events, events[1:]))
        span = events[0][0].elapsed_time(events[-1][1])
        return {"steps": len(events), "busy_ms": busy, "idle_ms": idle, "span_ms": span,
                "idle_fraction": idle / span if span > 0 else 0.0,
                "mean_idle_gap_ms": idle / max(1, len(events) - 1)}

    # ---- introspection --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        last = self.step_times[-1][1] - self.step_times[-1][0] if self.step_times else 0.0
        pc, sc = self.kv.stats, self.scheduler.stats
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting),
                           self.kv.pool.num_used, self.kv.pool.num_blocks, last, len(self.step_times),
                           self.runner.plan_steps, prefix_cache_queries=pc.queries, prefix_cache_hits=pc.hits,
                           prefix_cache_host_hits=pc.host_hits, kv_blocks_cached=self.kv.pool.num_cached,
                           kv_host_blocks_used=self.kv.num_host_slots_used,
                           kv_host_blocks_total=self.kv.host.num_slots if self.kv.host else 0,
                           kv_host_blocks_saved=pc.blocks_saved, kv_host_blocks_loaded=pc.blocks_loaded,
                           prefix_cache_disk_hits=pc.disk_hits, **self._disk_stats(),
                           tokens_computed=sc.tokens_computed, prefill_tokens_computed=sc.prefill_tokens_computed,
                           num_preemptions=sc.num_preemptions)

    def _disk_stats(self) -> dict[str, int]:
        disk = self.kv.disk
        if disk is None:
            return {}
        return dict(kv_disk_blocks_used=disk.num_used, kv_disk_blocks_total=disk.num_slots,
                    kv_disk_blocks_written=disk.blocks_written, kv_disk_blocks_read=disk.blocks_read)

    def set_kv_admission(self, rule: str) -> None:
        """Switches the KV admission rule ('reserve' or 'peak') while no request is in the engine."""
        if self._inflight is not None:
            raise ValueError("cannot switch the KV admission rule while a step is in flight")
        self.scheduler.set_kv_admission(rule)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix no request is using (device, host and disk tiers)."""
        self.kv.reset_prefix_cache()

    def check_kv_invariant(self) -> None:
        self.scheduler.check_invariants()
