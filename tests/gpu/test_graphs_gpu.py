"""GPU tests of CUDA graphs for every plan (skipped without CUDA): the attention kernels' graph forms
replayed with changing device-side counts, and greedy tokens of every plan with graphs against the
same engine eager (--enforce-eager), fp32 tiny checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEV = torch.device("cuda")


def _paged(gen, lens, bs, hk, d, dtype):
    nblk = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(nblk) + 2
    table = torch.zeros((len(lens), max(1, max(nblk))), dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen)[:sum(nblk)].to(torch.int32)
    i = 0
    for r, n in enumerate(nblk):
        table[r, :n] = perm[i:i + n]
        i += n
    kc = torch.randn(num_blocks, bs, hk, d, generator=gen).to(dtype)
    vc = torch.randn(num_blocks, bs, hk, d, generator=gen).to(dtype)
    return kc.to(DEV), vc.to(DEV), table.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_graph_forms_replay_with_new_counts(dtype):
    """One graph per kernel, replayed for several decode / request counts written to the device
    scalars: the rows computed follow the counts, the other rows keep their sentinel."""
    from nanoflow.kernels import reference, triton_ops
    gen = torch.Generator().manual_seed(0)
    hq, hk, d, bs = 32, 8, 128, 16
    lens = [700, 33, 1, 1024, 300, 64, 5, 2000]
    kc, vc, table = _paged(gen, lens, bs, hk, d, dtype)
    seq = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype).to(DEV)
    nrows = torch.zeros(1, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    triton_ops.paged_decode_attention_rows(q, kc, vc, table, seq, d ** -0.5, num_rows=nrows, row0=0, out=out)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g.capture_begin()
        triton_ops.paged_decode_attention_rows(q, kc, vc, table, seq, d ** -0.5, num_rows=nrows, row0=0, out=out,
                                               max_programs=40)
        g.capture_end()
    for n in (8, 3, 0, 6):
        out.fill_(7.0)
        nrows.fill_(n)
        g.replay()
        torch.cuda.synchronize()
        if n:
            want = reference.paged_decode_attention(q[:n], kc, vc, table[:n], seq[:n], d ** -0.5)
            err = ((out[:n].float() - want.float()).norm() / want.float().norm()).item()
            assert err < (1e-2 if dtype == torch.bfloat16 else 1e-4), (n, err)
        assert (out[n:] == 7.0).all()


def _greedy(path: str, plan: str, prompts, enforce_eager: bool):
    from nanoflow import LLM, SamplingParams
    llm = LLM(model=path, dtype="float32", num_kv_blocks=512, block_size=16, max_num_batched_tokens=128,
              gpu_memory_utilization=0.5, enforce_eager=enforce_eager, plan=plan, plan_choice="predicted")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.engine.runner


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.tiny_checkpoints import make_checkpoint
    return str(make_checkpoint("llama-gqa", tmp_path_factory.mktemp("g"), num_layers=3))


@pytest.mark.parametrize("plan", ["sequential", "overlap-2", "nano-4", "overlap-split"])
def test_every_plan_same_tokens_with_and_without_graphs(ckpt, plan, tmp_path, monkeypatch):
    from nanoflow.pipeline.plan import load_plan
    monkeypatch.setenv("NANOFLOW_CACHE_DIR", str(tmp_path / "no-profile"))  # every step under the plan
    d = load_plan(plan).to_dict()
    d["min_attn_share"] = 0.0
    path = tmp_path / f"{plan}.json"
    path.write_text(json.dumps(d))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 4000, (int(n),), generator=g).tolist() for n in (3, 17, 70, 150, 9, 40)]
    eager, _ = _greedy(ckpt, str(path), prompts, enforce_eager=True)
    graphs, runner = _greedy(ckpt, str(path), prompts, enforce_eager=False)
    assert graphs == eager
    info = runner.graphs.describe()
    assert runner.graphs.stats["replays"] > 0 or any(p["mode"] == "eager" for p in info), info
