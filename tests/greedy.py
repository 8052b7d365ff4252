"""The one greedy run the token-equality tests share: a tiny checkpoint on CPU in fp32, small KV
blocks, every request greedy with a fixed number of output tokens; afterwards the KV accounting
is checked and every block is back in the pool."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from nanoflow import LLM, SamplingParams


def greedy_run(model, prompts: list[list[int]], max_tokens: int = 8, prepare: Callable[[LLM], None] | None = None,
               **engine_kw) -> tuple[list[list[int]], LLM]:
    """(output tokens per prompt, the LLM). prepare(llm) runs before generating (e.g. to swap the
    runner's graphs); engine_kw override the defaults (dtype, device, block_size, num_kv_blocks)."""
    # 'predicted': a plan with min_attn_share 0 runs on every step (measured choice would let the
    # timings of this machine decide which steps, and the tests compare tokens under the plan).
    kw = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, plan_choice="predicted")
    kw.update(engine_kw)
    llm = LLM(model=str(model), **kw)
    if prepare is not None:
        prepare(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    llm.engine.check_kv_invariant()
    assert llm.engine.kv.pool.num_used == 0
    return [list(o.outputs[0].token_ids) for o in outs], llm


def greedy_tokens(model, prompts: list[list[int]], max_tokens: int = 8, **engine_kw) -> list[list[int]]:
    return greedy_run(model, prompts, max_tokens, **engine_kw)[0]


def plan_on_every_step(plan: str, directory: Path) -> str:
    """Path of a copy of the built-in `plan` with min_attn_share 0, so it runs on every step (not only
    on decode-heavy ones), written into `directory`."""
    from nanoflow.pipeline.plan import load_plan
    d = load_plan(plan).to_dict()
    d["min_attn_share"] = 0.0
    path = Path(directory) / f"{plan}-every-step.json"
    path.write_text(json.dumps(d))
    return str(path)
