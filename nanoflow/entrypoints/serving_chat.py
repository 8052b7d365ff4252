"""/v1/chat/completions: messages rendered by the tokenizer's chat template (on the thread pool), n
choices, streamed or not, with logprobs. Tools are accepted with tool_choice "none" (the template
sees them, as in vLLM); any tool call or function call is refused: there is no tool-call parser."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from nanoflow.entrypoints import errors, protocol as p
from nanoflow.entrypoints.async_engine import RequestStream
from nanoflow.entrypoints.errors import APIError
from nanoflow.entrypoints.serving_base import OpenAIServing, usage
from nanoflow.entrypoints.streaming import SSE_DONE, ChoiceState, SSEResponse, abort_all, advance, sse
from nanoflow.outputs import CompletionOutput, RequestOutput

try:  # transformers renders chat templates with jinja2; its errors are the user's template input
    from jinja2 import TemplateError as _TemplateError
except ImportError:  # pragma: no cover - then apply_chat_template itself reports the missing package
    _TemplateError = ValueError  # type: ignore[misc,assignment]

# Keys of chat_template_kwargs that would change what apply_chat_template returns, not the template.
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "tokenize", "return_dict", "add_generation_prompt",
                                       "continue_final_message", "chat_template", "tools", "documents"})


class ChatServing(OpenAIServing):
    async def create_chat_completion(self, request: Request) -> Response:
        req = await self.parse(request, p.ChatCompletionRequest)
        self.check_common(req)
        self.check_num_seqs(1, req.n)
        self.check_chars(sum(m.num_chars() for m in req.messages), "messages")
        ids = await self.in_pool(self._chat_prompt, req)
        self.check_prompt(ids, req.requested_max_tokens, "messages")
        params = self.sampling_params(req, req.requested_max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.submit(request_id, [ids], params)
        created = int(time.time())
        if req.stream:
            return SSEResponse(self._chat_stream(req, request_id, created, len(ids), streams[0]),
                               on_close=lambda: abort_all(streams))
        finals = await self.collect_unless_disconnected(request, streams)
        if finals is None:
            return Response(status_code=499)
        body = await self.in_pool(self._chat_response, req, request_id, created, len(ids), finals[0])
        return Response(body.model_dump_json(), media_type="application/json")

    def _chat_prompt(self, req: p.ChatCompletionRequest) -> list[int]:
        """The prompt's token ids (call on the pool: templates and tokenizing are CPU work)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.model_name!r} has no chat template (its tokenizer defines "
                                "none); use /v1/completions with a plain prompt", param="messages",
                           code="no_chat_template")
        try:
            messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in req.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        if req.tools:  # only with tool_choice "none" (check_common): the model may read them, not call them
            kwargs["tools"] = req.tools
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, _TemplateError) as exc:
            raise APIError(400, f"chat template failed: {exc}", param="messages", code="invalid_value") from None
        if not isinstance(text, str):
            raise APIError(400, "chat template did not render to text", param="messages", code="invalid_value")
        self.check_chars(len(text), "messages")
        # The template writes the special tokens itself (BOS included).
        return self.encode([text], add_special_tokens=False)[0]

    def _chat_choice_logprobs(self, req: p.ChatCompletionRequest, c: CompletionOutput, first: int) -> p.ChatCompletionLogProbs:
        end = len(c.token_ids)
        return self.chat_logprobs(c.token_ids[first:end], (c.logprobs or [])[first:end], req.top_logprobs or 0)

    def _chat_response(self, req: p.ChatCompletionRequest, request_id: str, created: int, prompt_len: int,
                  out: RequestOutput) -> p.ChatCompletionResponse:
        choices = []
        for c in out.outputs:
            if c.finish_reason == "error":
                raise errors.generation_failed()
            choices.append(p.ChatCompletionResponseChoice(
                index=c.index, message=p.ChatResponseMessage(content=c.text),
                logprobs=self._chat_choice_logprobs(req, c, 0) if req.logprobs else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return p.ChatCompletionResponse(id=request_id, created=created, model=self.model_name, choices=choices,
                                        usage=usage(prompt_len, sum(len(c.token_ids) for c in out.outputs)))

    async def _chat_stream(self, req: p.ChatCompletionRequest, request_id: str, created: int, prompt_len: int,
                      stream: RequestStream) -> AsyncIterator[str]:
        def chunk(choices: list[p.ChatCompletionResponseStreamChoice], usage_info=None) -> str:
            return sse(p.ChatCompletionStreamResponse(id=request_id, created=created, model=self.model_name,
                                                      choices=choices, usage=usage_info))

        states = {i: ChoiceState() for i in range(req.n)}
        try:
            for i in range(req.n):  # the role comes first, before any token, as OpenAI sends it
                yield chunk([p.ChatCompletionResponseStreamChoice(
                    index=i, delta=p.DeltaMessage(role="assistant", content=""))])
            async for out in stream:
                for c in out.outputs:
                    if c.finish_reason == "error":
                        raise errors.generation_failed()
                    delta = advance(states[c.index], c)
                    if delta is None:
                        continue
                    text, first_token = delta
                    logprobs = await self.in_pool(self._chat_choice_logprobs, req, c, first_token) if req.logprobs else None
                    yield chunk([p.ChatCompletionResponseStreamChoice(
                        index=c.index, delta=p.DeltaMessage(content=text), logprobs=logprobs,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
            if req.include_usage:
                yield chunk([], usage(prompt_len, sum(s.tokens_sent for s in states.values())))
        except Exception as exc:  # noqa: BLE001 - every stream ends with an error event and [DONE]
            yield errors.stream_error(exc).sse()
        yield SSE_DONE
