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
        ids = []
        for prompt, p in zip(prompts, params):
            request_id = str(self._counter)
            self._counter += 1
            self.engine.add_request(request_id, _prompt_of(prompt), p)
            ids.append(request_id)
        return self._run(ids, use_tqdm)

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


def _prompt_of(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return prompt
