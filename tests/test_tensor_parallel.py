"""Tensor parallelism on CPU over gloo with 2 processes (this one is rank 0, the worker is launched):
TP=2 gives TP=1's greedy tokens (fp32 tiny checkpoints) through the LLM API and the CLI, under plans
that cut the all-reduces, with KV heads replicated, with Mixtral's experts sharded; the search
profiles the collectives; a dead worker or a dead / failing rank 0 ends the group without a hang."""
from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.entrypoints.cli import main as cli_main
from tests.tiny_checkpoints import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ENGINE = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_num_batched_tokens=40)


def _prompts(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(10, 500) for _ in range(rng.randrange(1, 45))]}
            for _ in range(count)]


def _tokens(llm, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _reference(ckpt, prompts) -> list[list[int]]:
    return _tokens(LLM(model=str(ckpt), **ENGINE), prompts)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("tp"))


def test_tp2_tokens_plans_and_search(ckpt):
    """Budget 40 with 9 prompts of up to 44 tokens: chunked prefill beside decode rows, so the plans'
    cuts split the all-reduces into non-empty nano-batches. Then the search on this TP engine: the
    profiler times the all-reduces with the worker taking part, the MILP puts them on a network
    stream, and the plan runs on both ranks when validated. (One engine per process at a time: the
    default process group is torch's, so one test holds both checks.)"""
    prompts = _prompts(9)
    reference = _reference(ckpt, prompts)
    tp2 = LLM(model=str(ckpt), tensor_parallel_size=2, **ENGINE)
    try:
        assert _tokens(tp2, prompts) == reference
        for plan in ("tp-nano-4", "overlap-2"):  # TP's own plan; a dense plan folded onto the layer
            tp2.set_plan(plan)
            assert _tokens(tp2, prompts) == reference, plan
        assert tp2.engine.runner.plan_steps > 0
        tp2.set_plan("sequential")
        engine = tp2.engine
        assert engine.kv.pool.num_used == 0 and engine.model.layers[0].num_kv == 1  # 2 KV heads, 2 ranks
        assert engine.model.embed_tokens.shape[0] == -(-engine.model_config.vocab_size // 2)
        _check_search(engine)
        assert _tokens(tp2, prompts[:3]) == reference[:3]  # the ranks are still in step
    finally:
        tp2.engine.shutdown()


def _check_search(engine) -> None:
    from nanoflow.autosearch.profile import dense_batch
    from nanoflow.pipeline.workload_class import WorkloadClass
    from nanoflow.autosearch.profiler import profile_engine
    from nanoflow.autosearch.search import search
    from nanoflow.entrypoints.tune import time_plans
    from nanoflow.pipeline.plan import SEQUENTIAL

    wl = WorkloadClass("custom", "custom", num_decode=16, num_prefill_tokens=24, decode_context=20,
                       prefill_chunk=12)
    table = profile_engine(engine, wl, quick=True, reps=1, step=16, progress=False, log=lambda s: None)
    assert table.tp == 2
    for name in ("o_allreduce", "mlp_allreduce"):
        assert table.op(name)["resource"] == "network" and table.op_time(name, 40) > 0
        assert set(table.alone[name]) == {"full"}
    cands = search(table, time_limit=2.0, max_seconds=20.0)
    plan = next(c.plan for c in cands if c.mode != "sequential")
    assert plan.op_plan("o_allreduce").stream == "network" and plan.op_plan("o_allreduce").cuts
    with dense_batch(engine, wl) as batch:
        ms = time_plans(engine, batch, [SEQUENTIAL, plan], reps=1, rounds=1, warmup=1, progress=False)
    assert all(0 < t < float("inf") for t in ms)
    # The TP plan cuts the all-reduces at run time (both ranks run the recorded step).
    from nanoflow.pipeline.plan import load_plan
    from nanoflow.entrypoints.plan_show import record_timeline
    entries = record_timeline(engine, wl, warmup=0, plan=load_plan("tp-nano-4"))
    for name in ("o_allreduce", "mlp_allreduce"):
        rows = sorted((e["lo"], e["hi"]) for e in entries if e["op"] == name and e["layer"] == 1)
        assert rows == [(0, 8), (8, 40)] and {e["stream"] for e in entries if e["op"] == name} == {"network"}
    assert engine.kv.pool.num_used == 0


@pytest.mark.parametrize("name", ["mistral", "mixtral", "qwen3-moe", "qwen2-moe"])
def test_tp2_kv_replication_and_sharded_experts(name, tmp_path):
    """mistral: 1 KV head for 2 ranks (replicated); mixtral: every expert split over its inner dim;
    qwen3-moe: per-head q/k norms replicated; qwen2-moe: the shared expert split, its gate replicated."""
    ckpt = make_checkpoint(name, tmp_path)
    prompts = _prompts(5, seed=1)
    reference = _reference(ckpt, prompts)
    llm = LLM(model=str(ckpt), tensor_parallel_size=2, plan="tp-nano-4", **ENGINE)
    try:
        assert _tokens(llm, prompts) == reference
    finally:
        llm.engine.shutdown()


_CLI_ARGS = ["generate", "--device", "cpu", "--dtype", "float32", "--max-tokens", "8", "Hello world",
             "The cat sat on"]


@pytest.fixture(scope="module")
def cli_tp1_output(ckpt) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main([*_CLI_ARGS, "--model", str(ckpt)]) == 0
    return out.getvalue()


@pytest.mark.parametrize("launcher", ["plain", "torchrun"])
def test_cli_generate_tp2_matches_tp1(ckpt, cli_tp1_output, launcher):
    """`nanoflow generate --tensor-parallel-size 2` launching its worker itself, and the same command
    under torchrun (env:// rendezvous; rank 1 serves rank 0 inside LLMEngine and exits)."""
    prefix = [sys.executable] if launcher == "plain" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([*prefix, "-m", "nanoflow.entrypoints.cli", *_CLI_ARGS, "--model", str(ckpt),
                          "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == cli_tp1_output and cli_tp1_output.count("Completion:") == 2


def test_rank0_raises_when_a_worker_dies(ckpt):
    llm = LLM(model=str(ckpt), tensor_parallel_size=2, **ENGINE)
    try:
        worker = llm.engine.tp.workers.procs[0]
        worker.kill()
        worker.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="worker rank 1"):
            _tokens(llm, _prompts(2))
        assert time.monotonic() - start < 10
        with pytest.raises(RuntimeError, match="shut down"):  # the group stays down, no hang
            _tokens(llm, _prompts(2))
    finally:
        llm.engine.shutdown()


_RANK0 = """
import os, signal, sys
from nanoflow import LLM, SamplingParams
from nanoflow.pipeline.ops import Op
llm = LLM(model=sys.argv[1], tensor_parallel_size=2, dtype="float32", device="cpu", num_kv_blocks=64)
llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
print(llm.engine.tp.workers.procs[0].pid, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
def fail(state, lo, hi):
    raise RuntimeError("rank 0 fails mid-step")
ops = llm.engine.model.layers[1].ops  # rank 0 fails in layer 1, the worker waits in its all-reduce
ops[[op.name for op in ops].index("post_norm")] = Op("post_norm", ops[0].resource, fail)
llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["kill", "error"])
def test_worker_exits_when_rank0_dies_or_fails(ckpt, tmp_path, how):
    """SIGKILL of rank 0 (no cleanup at all), or an exception in rank 0 while the worker waits in a
    collective: the worker is gone within seconds."""
    script = tmp_path / "rank0.py"
    script.write_text(textwrap.dedent(_RANK0))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    err = tmp_path / "stderr.txt"
    with open(err, "w") as err_file:
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt), how], stdout=subprocess.PIPE,
                                stderr=err_file, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), err.read_text()[-3000:]
        worker_pid = int(line)
        code = proc.wait(timeout=60)
        assert code == (-signal.SIGKILL if how == "kill" else 1), err.read_text()[-3000:]
        if how == "error":
            assert "rank 0 fails mid-step" in err.read_text()
        deadline = time.monotonic() + 15
        while not _gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker_pid)
    finally:
        proc.kill()
        proc.wait()
