"""The transformers baseline of the throughput benchmark: static batched `generate` with our weights."""
from __future__ import annotations

import gc
import time

import torch

from nanoflow.bench.workloads import BenchRequest

HF_WARMUP_NEW_TOKENS = 8
"""The transformers baseline warms up with one untimed generate of its first batch and this many tokens."""


def run_hf_baseline(weights: dict[str, torch.Tensor], model_config, device: torch.device, dtype: torch.dtype,
                    requests: list[BenchRequest], batch_size: int, temperature: float) -> dict:
    """Times transformers' static batched `generate` on `requests` with the given (Hugging Face-named)
    weights: batches of `batch_size` consecutive requests, left-padded, each batch generating exactly
    the longest output length in it (min_new_tokens = max_new_tokens). A request's tokens past its own
    output length are static batching's waste: they count in `generated_tokens`, not in the rates."""
    import transformers

    model = build_hf_model(weights, model_config, device, dtype)
    eos = list(model_config.eos_token_ids)
    pad = eos[0] if eos else 0
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    with torch.inference_mode():
        _hf_generate(model, batches[0], HF_WARMUP_NEW_TOKENS, temperature, pad, eos, device)
        synchronize(device)
        t0 = time.perf_counter()
        generated = [_hf_generate(model, b, max(r.output_len for r in b), temperature, pad, eos, device)
                     for b in batches]
        synchronize(device)
        wall = time.perf_counter() - t0
    del model
    empty_cache(device)
    input_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    exact = all(n == max(r.output_len for r in b) for n, b in zip(generated, batches))
    return {
        "system": "transformers",
        "transformers_version": transformers.__version__,
        "method": "static batched generate, left padding, min_new_tokens = max_new_tokens",
        "batch_size": batch_size,
        "requests": len(requests),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "generated_tokens": sum(n * len(b) for n, b in zip(generated, batches)),
        "exact_output_lengths": exact,
        "wall_s": wall,
        "total_tokens_per_s": (input_tokens + output_tokens) / wall,
        "output_tokens_per_s": output_tokens / wall,
        "requests_per_s": len(requests) / wall,
        "warmup": f"one untimed generate of the first batch with {HF_WARMUP_NEW_TOKENS} new tokens",
        "same_weights": True,
    }


def build_hf_model(weights: dict[str, torch.Tensor], model_config, device: torch.device, dtype: torch.dtype):
    """A transformers model of `model_config` holding exactly `weights` (RuntimeError if any is missing)."""
    import transformers

    hf = model_config.to_hf_dict()
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    if getattr(config, "sliding_window", None):  # Qwen2-MoE's 0 already means none (None breaks its masks)
        config.sliding_window = None  # nanoflow attends to the whole context
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to(device=device, dtype=dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"transformers model does not match the exported weights: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.eval()


def _hf_generate(model, batch: list[BenchRequest], new_tokens: int, temperature: float, pad: int,
                 eos: list[int], device: torch.device) -> int:
    """One left-padded generate call; returns the number of tokens generated per row."""
    import transformers

    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids, dtype=torch.long)
        mask[row, width - len(r.prompt_token_ids):] = 1
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False)
    config = transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           pad_token_id=pad, eos_token_id=eos or None, **sampling)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return out.shape[1] - width


def empty_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
