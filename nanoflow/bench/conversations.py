"""Closed-loop runs of multi-round conversations on an offline engine, and the KV-reuse figures of a
run (prefill tokens computed vs prompt tokens, prefix-cache hits, host-tier traffic).

A conversation's next turn is added as soon as its previous turn finishes, its prompt the previous
prompt + the answer the engine generated + the next user tokens, so the cache can reuse the whole
history; the batch stays full because the other conversations keep running meanwhile.
"""
from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from nanoflow.bench.workloads import Conversation


@dataclass
class ConversationRun:
    """Token counts of a closed-loop run."""
    requests: int = 0
    """Turns run."""
    input_tokens: int = 0
    """Prompt tokens of all turns (the history included, as the model reads it)."""
    output_tokens: int = 0
    """Tokens generated."""
    expected_output_tokens: int = 0
    """Sum of the planned answer lengths."""


def run_conversations(engine, conversations: list[Conversation], temperature: float,
                      use_tqdm: bool = False, id_prefix: str = "conv") -> ConversationRun:
    """Runs every conversation to its end on `engine` (an LLMEngine); returns the token counts."""
    from nanoflow import SamplingParams

    run = ConversationRun(expected_output_tokens=sum(t.output_len for c in conversations for t in c.turns))
    live: dict[str, tuple[int, int, list[int]]] = {}  # request id -> (conversation, turn, prompt)

    def submit(c: int, t: int, prompt: list[int]) -> None:
        rid = f"{id_prefix}{c}.{t}"
        turn = conversations[c].turns[t]
        engine.add_request(rid, prompt, SamplingParams(max_tokens=turn.output_len, ignore_eos=True,
                                                       temperature=temperature))
        live[rid] = (c, t, prompt)

    for c, conv in enumerate(conversations):
        submit(c, 0, list(conv.turns[0].user_token_ids))
    bar = tqdm(total=sum(len(c.turns) for c in conversations), desc="Processed turns", dynamic_ncols=True,
               disable=not use_tqdm)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished or out.request_id not in live:
                continue
            c, t, prompt = live.pop(out.request_id)
            answer = list(out.outputs[0].token_ids)
            run.requests += 1
            run.input_tokens += len(prompt)
            run.output_tokens += len(answer)
            bar.update(1)
            turns = conversations[c].turns
            if t + 1 < len(turns):
                submit(c, t + 1, prompt + answer + list(turns[t + 1].user_token_ids))
    bar.close()
    return run


KV_COUNTERS = ("tokens_computed", "prefill_tokens_computed", "prefix_cache_queries", "prefix_cache_hits",
               "prefix_cache_host_hits", "kv_host_blocks_saved", "kv_host_blocks_loaded", "prefix_cache_disk_hits",
               "kv_disk_blocks_written", "kv_disk_blocks_read", "num_preemptions")
"""EngineStats counters a run reports the change of."""


def kv_counters(stats) -> dict[str, int] | None:
    """The KV-reuse counters of an EngineStats snapshot (None for an engine without them)."""
    if stats is None or not all(hasattr(stats, k) for k in KV_COUNTERS):
        return None
    return {k: int(getattr(stats, k)) for k in KV_COUNTERS}


def kv_reuse(before: dict[str, int] | None, after: dict[str, int] | None, prompt_tokens: int) -> dict | None:
    """What a run computed and reused: the counters' change, plus prefill as a fraction of the prompts."""
    if before is None or after is None:
        return None
    delta = {k: after[k] - before[k] for k in KV_COUNTERS}
    delta["prompt_tokens"] = prompt_tokens
    delta["prefill_fraction"] = delta["prefill_tokens_computed"] / prompt_tokens if prompt_tokens else None
    queries = delta["prefix_cache_queries"]
    delta["prefix_cache_hit_rate"] = delta["prefix_cache_hits"] / queries if queries else None
    return delta


def format_kv_reuse(label: str, kv: dict) -> str:
    frac = kv["prefill_fraction"]
    hit = kv["prefix_cache_hit_rate"]
    line = (f"{label}: prefill tokens computed {kv['prefill_tokens_computed']:,} of {kv['prompt_tokens']:,} prompt "
            f"tokens ({'n/a' if frac is None else f'{100 * frac:.1f}%'}); prefix cache hits "
            f"{kv['prefix_cache_hits']:,} of {kv['prefix_cache_queries']:,} tokens queried "
            f"({'n/a' if hit is None else f'{100 * hit:.1f}%'})")
    if kv["kv_host_blocks_saved"] or kv["kv_host_blocks_loaded"]:
        line += (f"; host tier: {kv['prefix_cache_host_hits']:,} hit tokens, {kv['kv_host_blocks_saved']:,} "
                 f"blocks saved, {kv['kv_host_blocks_loaded']:,} loaded")
    if kv.get("kv_disk_blocks_written") or kv.get("kv_disk_blocks_read"):
        line += (f"; disk tier: {kv['prefix_cache_disk_hits']:,} hit tokens, {kv['kv_disk_blocks_written']:,} "
                 f"blocks written, {kv['kv_disk_blocks_read']:,} read")
    if kv["num_preemptions"]:
        line += f"; {kv['num_preemptions']} preemptions"
    return line
