"""Prompt logprobs (SamplingParams.prompt_logprobs): the logprob of every prompt token given the tokens
before it, as `echo` with `logprobs` (lm-eval's loglikelihood) needs.

The row of prompt position p predicts token p + 1, so a prefill chunk at positions s..s+n-1 scores
prompt tokens s+1..s+n (the last prompt row samples the first output token as usual). The logits of
those rows are computed after the step's forward, in slices of a bounded number of rows so a long
prompt never materializes [prompt, vocab] at once, reduced on the device to (logprob, rank, top-k)
and copied to the host without waiting; the engine turns them into Logprob entries once it reads the
step. A request recomputed after preemption does not score a token twice (`next_token`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.forward_batch import ForwardBatch
from nanoflow.engine.request import Request
from nanoflow.outputs import Logprob

# Rows whose [rows, vocab] fp32 logits exist at once (512 MB at a 256k vocabulary).
_ROWS_PER_SLICE = 512


@dataclass
class PromptLogprobState:
    """Per-sequence progress: entries so far (None first: the first token has no context)."""
    entries: list[dict[int, Logprob] | None]
    next_token: int = 1
    """Prompt index of the next token to score (it is scored by the row of the token before it); it
    advances when a step is launched, `entries` when the engine reads that step."""

    def complete(self, prompt_len: int) -> bool:
        return len(self.entries) >= prompt_len


@dataclass
class PromptLogprobChunk:
    """Scores of prompt tokens first..first+m-1 of one sequence, from one step."""
    seq: Request
    first: int
    logprobs: torch.Tensor
    """[m] logprob of each prompt token."""
    ranks: torch.Tensor
    """[m] its 1-based rank in the vocabulary."""
    top_logprobs: torch.Tensor | None
    """[m, k] top-k logprobs (None when k is 0)."""
    top_ids: torch.Tensor | None


def plan_rows(scheduled: list[tuple[Request, int]], batch: ForwardBatch) -> list[tuple[Request, int, int, int]]:
    """(seq, first batch row, first prompt token scored, count) for every scheduled sequence that asks
    for prompt logprobs and has unscored prompt tokens in this step's chunk. Call before the
    sequences' num_computed_tokens advance."""
    out = []
    starts = batch.query_start_loc_cpu
    for i, (seq, n) in enumerate(scheduled):
        state: PromptLogprobState | None = getattr(seq.engine_state, "prompt_logprobs", None)
        if state is None:
            continue
        start = seq.num_computed_tokens
        first = max(state.next_token, start + 1)
        last = min(start + n, seq.num_prompt_tokens - 1)  # inclusive
        if last < first:
            continue
        out.append((seq, starts[i] + first - 1 - start, first, last - first + 1))
        state.next_token = last + 1
    return out


def compute(runner, batch: ForwardBatch, plans: list[tuple[Request, int, int, int]],
            to_host) -> list[PromptLogprobChunk]:
    """Device work for `plans` (see plan_rows); `to_host` starts each result's copy to the host."""
    chunks = []
    device = batch.input_ids.device
    for seq, row, first, count in plans:
        k = seq.params.prompt_logprobs or 0
        targets_all = _to_device(seq.prompt_token_ids[first:first + count], device)
        parts: list[tuple[torch.Tensor, ...]] = []
        for lo in range(0, count, _ROWS_PER_SLICE):
            hi = min(lo + _ROWS_PER_SLICE, count)
            rows = torch.arange(row + lo, row + hi, dtype=torch.long, device=device)
            logprobs = torch.log_softmax(runner.logits_of_rows(batch, rows), dim=-1)
            chosen = logprobs.gather(1, targets_all[lo:hi].unsqueeze(1))
            ranks = (logprobs > chosen).sum(dim=-1) + 1
            top = logprobs.topk(min(k, logprobs.shape[1]), dim=-1) if k else None
            parts.append((chosen.squeeze(1), ranks, *((top.values, top.indices) if top is not None else ())))
        joined = [torch.cat(column) for column in zip(*parts)]
        chunks.append(PromptLogprobChunk(seq, first, *[to_host(t) for t in joined[:2]],
                                         *([to_host(t) for t in joined[2:]] if k else [None, None])))
    return chunks


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def accept(chunk: PromptLogprobChunk) -> None:
    """Appends a chunk's entries to its sequence's PromptLogprobState (the step's copies are done)."""
    state: PromptLogprobState = chunk.seq.engine_state.prompt_logprobs
    targets = chunk.seq.prompt_token_ids[chunk.first:chunk.first + len(chunk.logprobs)]
    lps, ranks = chunk.logprobs.tolist(), chunk.ranks.tolist()
    top_lps = chunk.top_logprobs.tolist() if chunk.top_logprobs is not None else None
    top_ids = chunk.top_ids.tolist() if chunk.top_ids is not None else None
    for j, (token, lp, rank) in enumerate(zip(targets, lps, ranks)):
        entry = {token: Logprob(lp, rank)}
        if top_ids is not None:
            for r, (tid, tlp) in enumerate(zip(top_ids[j], top_lps[j]), start=1):
                if tid != token:
                    entry[tid] = Logprob(tlp, r)
        state.entries.append(entry)
