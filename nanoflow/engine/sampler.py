"""Sampler: logits -> next tokens (+ logprobs), honoring every SamplingParams option.

All work is batched over the rows on the logits' device; a stage runs only when some row needs it,
and then only on those rows. Per-row parameters reach the device through pinned, non-blocking
copies, so the sampler never waits for the GPU. The only per-row Python loop on the device side is
one random draw per row that has its own seeded generator.

Order (vLLM's): raw logprobs -> min_tokens masking -> repetition penalty -> presence / frequency
penalties -> greedy argmax -> temperature -> top_k -> top_p -> min_p -> sample.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from nanoflow.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """The requests that sample this step, one row of logits each."""

    params: list[SamplingParams]
    """Sampling options of each row."""
    prompt_token_ids: list[list[int]]
    """Prompt of each row (for the repetition penalty)."""
    output_token_ids: list[list[int]]
    """Tokens each row generated before this step (penalties, min_tokens). Ids outside the vocabulary
    (the engine's -1 placeholder for a token still in flight) count for min_tokens, not for penalties."""
    generators: list[torch.Generator | None]
    """Seeded generator of each row on the logits' device, None for unseeded rows (see make_generator)."""


@dataclass
class SamplerOutput:
    """Sampled tokens and, when any row asks, logprobs of the raw (unpenalized) distribution."""

    token_ids: torch.Tensor
    """[R] int64 on the logits' device."""
    logprobs: torch.Tensor | None
    """[R] float32 logprob of each chosen token; None when no row asks for logprobs."""
    top_logprobs: torch.Tensor | None
    """[R, K] float32 top logprobs, K = the largest logprobs asked; None when K is 0 or nobody asks."""
    top_token_ids: torch.Tensor | None
    """[R, K] int64 ids of top_logprobs."""


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator for SamplingParams.seed (create it once, when the request arrives)."""
    return torch.Generator(device=device).manual_seed(seed)


def _host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies a host tensor without blocking the host (pinned memory on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _host_to_device(torch.tensor(values, dtype=dtype), device)


def _on_rows(x: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], None]) -> None:
    """Runs fn in place on the given rows of x (on x itself when every row is listed)."""
    if len(rows) == x.shape[0]:
        fn(x)
        return
    index = _to_device(rows, torch.int64, x.device)
    sub = x.index_select(0, index)
    fn(sub)
    x.index_copy_(0, index, sub)


def _token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), V] float32 occurrence counts. Ids outside the vocabulary are ignored
    (on the device: an out-of-range index would be a device-side assert)."""
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=device)
    lengths = [len(t) for t in token_lists]
    if sum(lengths) == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), torch.tensor(lengths))
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.int64)
    rows, flat = _host_to_device(rows, device), _host_to_device(flat, device)
    valid = (flat >= 0) & (flat < vocab_size)
    counts.index_put_((rows, flat.clamp(0, vocab_size - 1)), valid.float(), accumulate=True)
    return counts


class Sampler:
    """Turns a [R, V] logits tensor into one token per row. Holds the generator of unseeded rows."""

    def __init__(self, eos_token_ids: int | Iterable[int] | None, seed: int = 0) -> None:
        if eos_token_ids is None:
            eos_token_ids = []
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids: list[int] = list(eos_token_ids)
        self.seed = seed
        # One generator per device, created on first use (the device is only known from the logits).
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = make_generator(self.seed, device)
        return self._generators[device]

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [R, V], got shape {tuple(logits.shape)}")
        num_rows = logits.shape[0]
        for name in ("params", "prompt_token_ids", "output_token_ids", "generators"):
            if len(getattr(batch, name)) != num_rows:
                raise ValueError(f"batch.{name} has {len(getattr(batch, name))} rows, logits have {num_rows}")
        params = batch.params

        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
        # A private fp32 copy: every later stage edits it in place.
        x = logits.to(torch.float32, copy=True)

        self._mask_stop_tokens_before_min_tokens(x, batch)
        self._apply_penalties(x, batch)
        token_ids = self._choose_tokens(x, batch)
        return self._output(token_ids, raw_logprobs, params)

    def _mask_stop_tokens_before_min_tokens(self, x: torch.Tensor, batch: SamplingBatch) -> None:
        rows: list[int] = []
        cols: list[int] = []
        vocab_size = x.shape[1]
        for i, (p, out) in enumerate(zip(batch.params, batch.output_token_ids)):
            if len(out) < p.min_tokens:
                # EOS is masked even with ignore_eos: min_tokens asks for that many non-EOS tokens.
                for t in set(self.eos_token_ids).union(p.stop_token_ids):
                    if 0 <= t < vocab_size:
                        rows.append(i)
                        cols.append(t)
        if rows:
            x.index_put_((_to_device(rows, torch.int64, x.device), _to_device(cols, torch.int64, x.device)),
                         x.new_full((), float("-inf")))

    def _apply_penalties(self, x: torch.Tensor, batch: SamplingBatch) -> None:
        params = batch.params
        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rep_rows:
            def repetition(sub: torch.Tensor) -> None:
                seen = _token_counts([batch.prompt_token_ids[i] + batch.output_token_ids[i] for i in rep_rows],
                                     sub.shape[1], sub.device) > 0
                penalty = _to_device([params[i].repetition_penalty for i in rep_rows],
                                     torch.float32, sub.device).unsqueeze(1)
                penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
                sub.copy_(torch.where(seen, penalized, sub))
            _on_rows(x, rep_rows, repetition)

        pf_rows = [i for i, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
        if pf_rows:
            def presence_frequency(sub: torch.Tensor) -> None:
                counts = _token_counts([batch.output_token_ids[i] for i in pf_rows], sub.shape[1], sub.device)
                pf = _to_device([[params[i].presence_penalty, params[i].frequency_penalty] for i in pf_rows],
                                torch.float32, sub.device)
                sub.sub_(counts * pf[:, 1:2] + (counts > 0).float() * pf[:, 0:1])
            _on_rows(x, pf_rows, presence_frequency)

    def _choose_tokens(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        params = batch.params
        greedy = [p.is_greedy for p in params]
        if all(greedy):
            return x.argmax(dim=-1)
        greedy_tokens = x.argmax(dim=-1) if any(greedy) else None

        # Greedy rows divide by 1 (their temperature may be 0); their sample is discarded below.
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        if any(t != 1.0 for t in temps):
            x.div_(_to_device(temps, torch.float32, x.device).unsqueeze(1))
        sampled = [i for i, g in enumerate(greedy) if not g]
        self._top_k(x, [i for i in sampled if params[i].top_k_enabled], params)
        self._top_p(x, [i for i in sampled if params[i].top_p < 1.0], params)
        self._min_p(x, [i for i in sampled if params[i].min_p > 0.0], params)
        tokens = self._sample(x, batch, sampled)
        if greedy_tokens is not None:
            is_greedy = _to_device(greedy, torch.bool, x.device)
            tokens = torch.where(is_greedy, greedy_tokens, tokens)
        return tokens

    @staticmethod
    def _top_k(x: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> None:
        if not rows:
            return
        ks = [min(params[i].top_k, x.shape[1]) for i in rows]
        k_max = max(ks)

        def keep_top_k(sub: torch.Tensor) -> None:
            top = sub.topk(k_max, dim=-1).values
            k = _to_device(ks, torch.int64, sub.device).unsqueeze(1)
            threshold = top.gather(1, k - 1)  # the k-th largest logit of each row
            sub.masked_fill_(sub < threshold, float("-inf"))
        _on_rows(x, rows, keep_top_k)

    @staticmethod
    def _top_p(x: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> None:
        if not rows:
            return

        def keep_top_p(sub: torch.Tensor) -> None:
            top_p = _to_device([params[i].top_p for i in rows], torch.float32, sub.device).unsqueeze(1)
            sorted_logits, order = sub.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens before it already reach top_p (the top token always stays).
            drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
            drop_sorted[:, 0] = False
            drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
            sub.masked_fill_(drop, float("-inf"))
        _on_rows(x, rows, keep_top_p)

    @staticmethod
    def _min_p(x: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> None:
        if not rows:
            return

        def keep_min_p(sub: torch.Tensor) -> None:
            min_p = _to_device([params[i].min_p for i in rows], torch.float32, sub.device).unsqueeze(1)
            probs = sub.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p
            sub.masked_fill_(probs < threshold, float("-inf"))
        _on_rows(x, rows, keep_min_p)

    def _sample(self, x: torch.Tensor, batch: SamplingBatch, sampled: list[int]) -> torch.Tensor:
        """Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i."""
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._generator(x.device))
        for i in sampled:
            g = batch.generators[i]
            if g is not None:
                # A whole row from the request's own generator: independent of batch composition.
                noise[i].exponential_(generator=g)
        # A zero draw would turn a masked token's 0 / 0 into NaN, which argmax would pick.
        noise.clamp_min_(torch.finfo(torch.float32).tiny)
        return probs.div_(noise).argmax(dim=-1)

    @staticmethod
    def _output(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None,
                params: list[SamplingParams]) -> SamplerOutput:
        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        k = max(p.logprobs or 0 for p in params)
        if k == 0:
            return SamplerOutput(token_ids, chosen, None, None)
        top = raw_logprobs.topk(min(k, raw_logprobs.shape[1]), dim=-1)
        return SamplerOutput(token_ids, chosen, top.values, top.indices)
