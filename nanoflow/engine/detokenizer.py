"""Incremental detokenization with stop strings, and the stop-token check.

Text is decoded a few tokens at a time with vLLM's prefix / read offsets: each step decodes only the
tokens from `prefix_offset` on, and the new text is what that decode adds beyond the already-read
tokens. A decode that ends in U+FFFD (a multi-byte character split across byte-level BPE tokens) is
held back until the character is complete.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Literal

from nanoflow.sampling_params import SamplingParams

# Prompt tokens decoded before the first output token, so tokenizers that drop a leading space at
# the start of a decode (SentencePiece) still produce it (vLLM uses the same 5).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def check_stop_token(token_id: int, params: SamplingParams, eos_token_ids: int | Collection[int],
                     num_output_tokens: int) -> Literal["stop"] | None:
    """'stop' when token_id ends the request: EOS (unless ignore_eos) or one of stop_token_ids, once
    num_output_tokens (counting token_id) reaches min_tokens. Length limits are the engine's."""
    if num_output_tokens < params.min_tokens:
        return None
    if isinstance(eos_token_ids, int):
        eos_token_ids = (eos_token_ids,)
    if not params.ignore_eos and token_id in eos_token_ids:
        return "stop"
    if token_id in params.stop_token_ids:
        return "stop"
    return None


class IncrementalDetokenizer:
    """Output text of one request, grown token by token, ending at the first stop string."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._params = params
        # The Rust tokenizer decodes without transformers' Python overhead and without
        # clean_up_tokenization_spaces, which could rewrite already-emitted text.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer = tokenizer
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""
        self._stop_str: str | None = None
        self._finished_by_token = False
        self.num_output_tokens = 0
        """Output tokens appended so far (those after a stop string included)."""
        # Streaming holds back this many characters: the longest partial stop string. With
        # include_stop_str_in_output a partial stop string may be shown, it will be kept anyway.
        self._holdback = 0 if params.include_stop_str_in_output else max(params.max_stop_len - 1, 0)

    @property
    def stopped(self) -> bool:
        """A stop string matched; no more tokens should be generated."""
        return self._stop_str is not None

    @property
    def stop_str(self) -> str | None:
        """The stop string that matched, if any."""
        return self._stop_str

    @property
    def output_text(self) -> str:
        """All text decoded so far, ending right before the stop string (or right after it with
        include_stop_str_in_output). The final text once the request finishes."""
        return self._text

    @property
    def visible_text(self) -> str:
        """Text safe to stream while unfinished: never shows a prefix of a stop string that may later
        match. Equals output_text once stopped."""
        if self.stopped or self._finished_by_token or self._holdback == 0:
            return self._text
        return self._text[: max(len(self._text) - self._holdback, 0)]

    def append(self, new_token_ids: Sequence[int], *, stopped_by_token: bool = False) -> str | None:
        """Adds generated tokens; returns the stop string when one matches (tokens after it are not
        decoded). stopped_by_token: the last token is EOS / a stop token id that ended the request;
        like vLLM, its text is left out unless include_stop_str_in_output."""
        if self.stopped:
            raise RuntimeError("append() after a stop string matched")
        params = self._params
        last = len(new_token_ids) - 1
        for i, token_id in enumerate(new_token_ids):
            self.num_output_tokens += 1
            if i == last and stopped_by_token:
                self._finished_by_token = True
                if not params.include_stop_str_in_output:
                    break
            self._ids.append(int(token_id))
            checked_len = len(self._text)
            self._text += self._decode_next()
            # vLLM checks stop strings only after more than min_tokens tokens.
            if params.stop and self.num_output_tokens > params.min_tokens and self._find_stop(checked_len):
                return self._stop_str
        return None

    def _decode(self, ids: list[int]) -> str:
        skip = self._params.skip_special_tokens
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip)
        return self._tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    def _decode_next(self) -> str:
        """The text the newest token completes ("" while a character is still incomplete)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]

    def _find_stop(self, checked_len: int) -> bool:
        """Looks for stop strings that end in the text added after checked_len characters; the
        earliest match wins. Truncates the text and records the match."""
        best: tuple[int, str] | None = None
        for stop in self._params.stop:
            index = self._text.find(stop, max(checked_len - len(stop) + 1, 0))
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return False
        index, stop = best
        end = index + len(stop) if self._params.include_stop_str_in_output else index
        self._text = self._text[:end]
        self._stop_str = stop
        return True
