"""/v1/completions: text or token prompts (or batches of them) x n choices, streamed or not, with
logprobs and `echo` (the prompt, with its logprobs, before the completion; `max_tokens: 0` returns the
prompt alone: lm-eval's loglikelihood)."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from nanoflow.entrypoints import errors, protocol as p
from nanoflow.entrypoints.async_engine import RequestStream
from nanoflow.entrypoints.serving_base import LogprobEntries, OpenAIServing, usage
from nanoflow.entrypoints.streaming import SSE_DONE, ChoiceState, SSEResponse, abort_all, advance, merge, sse
from nanoflow.outputs import CompletionOutput, RequestOutput


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None  # the text given, or (for echo) the decoded token ids


class CompletionServing(OpenAIServing):
    async def create_completion(self, request: Request) -> Response:
        req = await self.parse(request, p.CompletionRequest)
        self.check_common(req)
        prompts = await self._completion_prompts(req)
        self.check_num_seqs(len(prompts), req.n)
        params = self.sampling_params(req, req.max_tokens)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.submit(request_id, [pr.ids for pr in prompts], params)
        created = int(time.time())
        if req.stream:
            return SSEResponse(self._completion_stream(req, request_id, created, prompts, streams),
                               on_close=lambda: abort_all(streams))
        finals = await self.collect_unless_disconnected(request, streams)
        if finals is None:
            return Response(status_code=499)
        body = await self.in_pool(self._completion_response, req, request_id, created, prompts, finals)
        return Response(body.model_dump_json(), media_type="application/json")

    async def _completion_prompts(self, req: p.CompletionRequest) -> list[_Prompt]:
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]  # type: ignore[list-item]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise errors.APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        self.check_num_seqs(len(items), req.n)
        texts = [t for t in items if isinstance(t, str)]
        for text in texts:
            self.check_chars(len(text), "prompt")
        encoded = iter(await self.in_pool(self.encode, texts) if texts else [])
        prompts = [_Prompt(next(encoded), item) if isinstance(item, str) else _Prompt(item, None) for item in items]
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None and not req.echo_only
        for pr in prompts:
            self.check_prompt(pr.ids, req.max_tokens if explicit else None)
        if req.echo:
            for pr in prompts:
                if pr.text is None:
                    pr.text = await self.in_pool(self.decode, pr.ids)
        return prompts

    # ---- one choice's text and logprobs
    def _choice_logprobs(self, req: p.CompletionRequest, prompt: _Prompt, out: RequestOutput,
                         c: CompletionOutput, first: int, text_offset: int, echo: bool) -> p.CompletionLogProbs:
        """Logprobs of c's tokens from `first` on (and, with `echo`, of the prompt before them)."""
        ids: list[int] = []
        entries: list = []
        if echo:
            ids += prompt.ids
            entries += _prompt_entries(out, len(prompt.ids))
        if not req.echo_only:
            end = len(c.token_ids)
            ids += c.token_ids[first:end]
            entries += (c.logprobs or [])[first:end]
        return self.completion_logprobs(ids, entries, text_offset)

    def _completion_response(self, req: p.CompletionRequest, request_id: str, created: int, prompts: list[_Prompt],
                  finals: list[RequestOutput]) -> p.CompletionResponse:
        choices, completion_tokens = [], 0
        for i, (prompt, out) in enumerate(zip(prompts, finals)):
            for c in out.outputs:
                if c.finish_reason == "error":
                    raise errors.generation_failed()
                text = c.text if not req.echo else (prompt.text or "") + ("" if req.echo_only else c.text)
                completion_tokens += 0 if req.echo_only else len(c.token_ids)
                logprobs = self._choice_logprobs(req, prompt, out, c, 0, 0, req.echo) \
                    if req.logprobs is not None else None
                choices.append(p.CompletionResponseChoice(
                    index=i * req.n + c.index, text=text, logprobs=logprobs,
                    finish_reason="length" if req.echo_only else c.finish_reason,
                    stop_reason=None if req.echo_only else c.stop_reason))
        return p.CompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                    usage=usage(sum(len(pr.ids) for pr in prompts), completion_tokens))

    async def _completion_stream(self, req: p.CompletionRequest, request_id: str, created: int, prompts: list[_Prompt],
                      streams: list[RequestStream]) -> AsyncIterator[str]:
        states: dict[int, ChoiceState] = {}
        try:
            async for i, out in merge(streams):
                for c in out.outputs:
                    if c.finish_reason == "error":
                        raise errors.generation_failed()
                    index = i * req.n + c.index
                    st = states.setdefault(index, ChoiceState())
                    chunk = await self._completion_chunk(req, prompts[i], out, c, st, index)
                    if chunk is not None:
                        yield sse(p.CompletionStreamResponse(id=request_id, created=created,
                                                             model=self.model_name, choices=[chunk]))
            if req.include_usage:
                yield sse(p.CompletionStreamResponse(
                    id=request_id, created=created, model=self.model_name, choices=[],
                    usage=usage(sum(len(pr.ids) for pr in prompts), sum(s.tokens_sent for s in states.values()))))
        except Exception as exc:  # noqa: BLE001 - every stream ends with an error event and [DONE]
            yield errors.stream_error(exc).sse()
        yield SSE_DONE

    async def _completion_chunk(self, req: p.CompletionRequest, prompt: _Prompt, out: RequestOutput, c: CompletionOutput,
                     st: ChoiceState, index: int) -> p.CompletionResponseChoice | None:
        echo = req.echo and not st.started
        if req.echo_only:
            if c.finish_reason is None or st.finished:
                return None  # one chunk, once the prompt logprobs are complete
            st.finished = st.started = True
            logprobs = await self.in_pool(self._choice_logprobs, req, prompt, out, c, 0, 0, True) \
                if req.logprobs is not None else None
            return p.CompletionResponseChoice(index=index, text=prompt.text or "", logprobs=logprobs,
                                              finish_reason="length")
        sent_before = st.text_sent
        delta = advance(st, c)
        if delta is None:
            return None
        text, first_token = delta
        st.started = True
        base = len(prompt.text or "") if req.echo else 0
        logprobs = None
        if req.logprobs is not None:
            offset = 0 if echo else base + sent_before
            logprobs = await self.in_pool(self._choice_logprobs, req, prompt, out, c, first_token, offset, echo)
        return p.CompletionResponseChoice(index=index, text=(prompt.text or "") + text if echo else text,
                                          logprobs=logprobs, finish_reason=c.finish_reason,
                                          stop_reason=c.stop_reason)


def _prompt_entries(out: RequestOutput, prompt_len: int) -> LogprobEntries:
    entries = out.prompt_logprobs
    if entries is None or len(entries) < prompt_len:
        raise RuntimeError("prompt logprobs are missing from the engine's output")
    return entries
