"""Offline API: LLM(model=...).generate(prompts, params) -> list[RequestOutput]."""
from __future__ import annotations

import time
from typing import Sequence

from tqdm import tqdm

from nanoflow.config import EngineConfig
from nanoflow.engine.engine import LLMEngine
from nanoflow.outputs import RequestOutput
from nanoflow.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """Keyword arguments are EngineConfig fields, e.g. LLM(model="llama-3-8b", load_format="dummy")."""

    def __init__(self, model: str = "default", **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs), stream_text=False)
        self.model_config = self.engine.model_config
        self._counter = 0

    def set_plan(self, plan: str) -> None:
        """Switch the pipeline plan between generate calls (same weights, same KV cache)."""
        self.engine.set_plan(plan)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        ids = [str(self._counter + i) for i in range(len(prompts))]
        self._counter += len(prompts)
        resolved = [_prompt_of(prompt) for prompt in prompts]
        order = range(len(prompts))
        if self.engine.config.enable_prefix_caching:
            order = prefix_grouped_order(resolved)
        for i in order:
            self.engine.add_request(ids[i], resolved[i], params[i])
        return self._run(ids, use_tqdm)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (device and host tier), e.g. between benchmark runs."""
        self.engine.reset_prefix_cache()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, in_tokens, out_tokens = time.perf_counter(), 0, 0
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    in_tokens += len(out.prompt_token_ids) * len(out.outputs)
                    out_tokens += sum(len(o.token_ids) for o in out.outputs)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"input: {in_tokens / elapsed:.1f} toks/s, "
                                        f"output: {out_tokens / elapsed:.1f} toks/s", refresh=False)
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]


def prefix_grouped_order(prompts: Sequence[str | list[int]]) -> list[int]:
    """The order to admit an offline batch in (BatchLLM's global prefix grouping): sorted by content,
    so prompts sharing a prefix are admitted one after another and the prefix is computed once (the
    scheduler holds a prompt back while its shared block is being computed, then reuses it), and a
    group's blocks are reused while they are still cached. Token-id prompts come first (sorted by
    ids), then texts (sorted as strings: a shared leading text is a shared leading token run)."""
    def key(i: int):
        p = prompts[i]
        return (1, p, ()) if isinstance(p, str) else (0, "", tuple(p))
    return sorted(range(len(prompts)), key=key)


def _prompt_of(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return prompt
