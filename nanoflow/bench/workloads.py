"""Benchmark workloads: `--workload` specs, trace loading, and seeded request sampling.

A spec is one of
- ``constant:IN:OUT``  every request IN random prompt tokens and exactly OUT output tokens;
- ``splitwise``        the Azure LLM inference conv trace (``AzureLLMInferenceTrace_conv.csv``);
- ``lmsys``            NanoFlow's LMSYS-Chat length file (``nanoflow/lmsys.csv``);
- ``sharegpt``         NanoFlow's ShareGPT length file (``nanoflow/sharegpt.csv``);
  ``splitwise`` ships in the package (``nanoflow/bench/traces/splitwise.csv``, CC-BY 4.0, sources in
  ``traces/SOURCES.md``); ``lmsys`` and ``sharegpt`` do not (their notes ask not to redistribute them:
  derived from LMSYS-Chat-1M and ShareGPT), so they are read from ``--trace-dir`` or
  ``$NANOFLOW_TRACE_DIR`` (a copy of NanoFlow's ``datasets/traces``); such a folder is read first;
- ``PATH.csv``         any CSV with ``ContextTokens,GeneratedTokens`` columns (and optionally ``TIMESTAMP``);
- ``shared-prefix:SYS:UNIQUE:OUT[:GROUPS]``  one long shared system prompt of SYS random tokens (or GROUPS
                       of them, requests interleaved round-robin), then UNIQUE random tokens per request,
                       exactly OUT output tokens: what prefix caching is for;
- ``multi-round:TRACE[:ROUNDS]``  conversations of ROUNDS turns (default 4): each turn's new user tokens
                       and answer length from one row of TRACE (lmsys, sharegpt, splitwise or a PATH.csv),
                       and each later turn carries the earlier turns, prompts and answers, as its prompt
                       (`sample_conversations`; run closed-loop, one turn after the other).

Trace rows with input > 3072 or output > 1024 tokens are dropped, as NanoFlow's trace generator does,
and so are rows with 0 tokens and rows longer (input + output) than the model's context.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

MAX_INPUT_TOKENS = 3072
"""NanoFlow's filter: trace rows with more prompt tokens are dropped."""
MAX_OUTPUT_TOKENS = 1024
"""NanoFlow's filter: trace rows with more output tokens are dropped."""
TOKEN_ID_MARGIN = 10
"""Random prompt ids are drawn from [margin, vocab_size - margin), away from special ids at either end."""
TRACE_DIR_ENV = "NANOFLOW_TRACE_DIR"
"""Environment variable naming the folder of the trace CSVs."""

NAMED_TRACES = {
    "splitwise": "AzureLLMInferenceTrace_conv.csv",
    "lmsys": "nanoflow/lmsys.csv",
    "sharegpt": "nanoflow/sharegpt.csv",
}
"""Named trace workloads and their file, relative to a trace folder (the original downloads' layout)."""
PACKAGED_TRACE_DIR = Path(__file__).resolve().parent / "traces"
PACKAGED_TRACES = ("splitwise",)
"""Named traces shipped in PACKAGED_TRACE_DIR; the others need --trace-dir / $NANOFLOW_TRACE_DIR."""
UNSHIPPED_TRACE_SOURCE = ("https://github.com/efeslab/Nanoflow, folder datasets/traces (lmsys.csv, sharegpt.csv: "
                          "NanoFlow's length files, not shipped here because their notes ask not to redistribute them)")
"""The copies shipped in the package, one <workload name>.csv each (sources and licences: SOURCES.md)."""

_SPEC_FORMS = ("constant:IN:OUT, splitwise, lmsys, sharegpt, a PATH.csv, shared-prefix:SYS:UNIQUE:OUT[:GROUPS], "
               "or multi-round:TRACE[:ROUNDS]")
DEFAULT_ROUNDS = 4
"""Turns per conversation of a multi-round workload when the spec does not say."""


@dataclass(frozen=True)
class Workload:
    """A parsed `--workload` spec."""

    spec: str
    """The spec as given."""
    kind: str
    """'constant' or 'trace'."""
    input_len: int | None = None
    """Prompt tokens of every request ('constant' only)."""
    output_len: int | None = None
    """Output tokens of every request ('constant' only)."""
    path: Path | None = None
    """The resolved trace CSV ('trace' and 'multi-round')."""
    prefix_len: int | None = None
    """Shared system-prompt tokens ('shared-prefix' only; input_len is then the unique part)."""
    num_groups: int = 1
    """Distinct system prompts ('shared-prefix' only)."""
    rounds: int | None = None
    """Turns per conversation ('multi-round' only)."""

    def describe(self) -> str:
        """A short human-readable name (the spec, plus the file for traces)."""
        return self.spec if self.path is None else f"{self.spec} ({self.path.name})"


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request."""

    prompt_token_ids: list[int]
    """Random prompt token ids (seeded)."""
    output_len: int
    """Exact number of tokens to generate (the benchmark sets ignore_eos)."""
    arrival_time: float | None = None
    """Seconds after the first request, from the trace's timestamps; None when the trace has none."""


@dataclass(frozen=True)
class TraceRows:
    """The rows of a trace CSV."""

    input_lens: list[int]
    """ContextTokens per row."""
    output_lens: list[int]
    """GeneratedTokens per row."""
    timestamps: list[float] | None
    """TIMESTAMP per row in seconds (any origin), or None when the column is absent or not times."""


def default_trace_dirs() -> list[Path]:
    """Where trace CSVs are searched when no folder is given, in order: $NANOFLOW_TRACE_DIR, the package."""
    env = os.environ.get(TRACE_DIR_ENV)
    return ([Path(env)] if env else []) + [PACKAGED_TRACE_DIR]


def find_trace_file(relative: str, trace_dir: str | Path | None = None) -> Path:
    """The trace file `relative` (e.g. 'nanoflow/lmsys.csv') in `trace_dir` only, or else in
    default_trace_dirs().

    Each folder is tried with the relative path, the bare file name (a flat copy) and, for a named
    trace, <name>.csv (the package's and NanoFlow's naming). FileNotFoundError lists every path tried.
    """
    dirs = [Path(trace_dir)] if trace_dir is not None else default_trace_dirs()
    names = [f"{name}.csv" for name, path in NAMED_TRACES.items() if path == relative]
    tried: list[Path] = []
    for folder in dirs:
        for candidate in (folder / relative, folder / Path(relative).name, *(folder / n for n in names)):
            if candidate in tried:
                continue
            tried.append(candidate)
            if candidate.is_file():
                return candidate
    where = "\n  ".join(str(p) for p in tried)
    unshipped = any(name not in PACKAGED_TRACES for name, path in NAMED_TRACES.items() if path == relative)
    source = f"\nthis trace does not ship with nanoflow; get it from {UNSHIPPED_TRACE_SOURCE}" if unshipped else ""
    raise FileNotFoundError(
        f"trace file {relative!r} not found; looked in:\n  {where}{source}\n"
        f"pass --trace-dir or set ${TRACE_DIR_ENV} to the folder holding the trace CSVs")


def parse_workload(spec: str, trace_dir: str | Path | None = None) -> Workload:
    """Parses a `--workload` spec; trace files are located now, so a missing file fails early."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"workload must be one of {_SPEC_FORMS}, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("shared-prefix"):
        return _parse_shared_prefix(spec)
    if spec.startswith("multi-round"):
        return _parse_multi_round(spec, trace_dir)
    if spec.startswith("constant:") or spec == "constant":
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValueError(f"workload {spec!r}: expected constant:IN:OUT, e.g. constant:512:512")
        lens = []
        for name, text in (("IN", parts[1]), ("OUT", parts[2])):
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"workload {spec!r}: {name} must be an integer, got {text!r}") from None
            if value <= 0:
                raise ValueError(f"workload {spec!r}: {name} must be positive, got {value}")
            lens.append(value)
        return Workload(spec=spec, kind="constant", input_len=lens[0], output_len=lens[1])
    if spec in NAMED_TRACES:
        return Workload(spec=spec, kind="trace", path=find_trace_file(NAMED_TRACES[spec], trace_dir))
    if spec.lower().endswith(".csv"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"workload trace file {spec!r} not found (looked at {path.resolve()})")
        return Workload(spec=spec, kind="trace", path=path)
    raise ValueError(f"workload must be one of {_SPEC_FORMS}, got {spec!r}")


def load_trace(path: str | Path) -> TraceRows:
    """Reads a trace CSV; ValueError names the file and line of a malformed row."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ("ContextTokens", "GeneratedTokens") if c not in columns]
        if missing:
            raise ValueError(f"trace {path}: missing column(s) {', '.join(missing)} (has {columns})")
        input_lens, output_lens, stamps = [], [], []
        for line, row in enumerate(reader, start=2):
            try:
                input_lens.append(int(row["ContextTokens"]))
                output_lens.append(int(row["GeneratedTokens"]))
            except (TypeError, ValueError):
                raise ValueError(
                    f"trace {path} line {line}: ContextTokens and GeneratedTokens must be integers, "
                    f"got {row.get('ContextTokens')!r}, {row.get('GeneratedTokens')!r}") from None
            stamps.append(row.get("TIMESTAMP"))
    timestamps = _parse_timestamps(stamps) if "TIMESTAMP" in columns else None
    return TraceRows(input_lens=input_lens, output_lens=output_lens, timestamps=timestamps)


def _parse_timestamps(values: list[str | None]) -> list[float] | None:
    """Seconds for every value (a number, or 'YYYY-MM-DD HH:MM:SS[.fraction]'), or None if any is not a time."""
    out = []
    for value in values:
        seconds = _parse_timestamp(value)
        if seconds is None:
            return None
        out.append(seconds)
    return out


def _parse_timestamp(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    except ValueError:
        pass
    main, _, fraction = value.partition(".")
    try:
        moment = datetime.strptime(main, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None
    if fraction and not fraction.isdigit():
        return None
    # strptime takes at most 6 fraction digits and the Azure trace has 7: add the fraction separately.
    whole = (moment - datetime(1970, 1, 1)).total_seconds()
    return whole + (float(f"0.{fraction}") if fraction else 0.0)


def filter_rows(rows: TraceRows, max_model_len: int | None) -> list[int]:
    """Indices of the rows kept: 0 < input <= 3072, 0 < output <= 1024, input + output <= max_model_len."""
    keep = []
    for i, (n_in, n_out) in enumerate(zip(rows.input_lens, rows.output_lens)):
        if not (0 < n_in <= MAX_INPUT_TOKENS and 0 < n_out <= MAX_OUTPUT_TOKENS):
            continue
        if max_model_len is not None and n_in + n_out > max_model_len:
            continue
        keep.append(i)
    return keep


def sample_requests(workload: Workload, num_requests: int, seed: int, vocab_size: int,
                    max_model_len: int | None, contiguous: bool = False) -> list[BenchRequest]:
    """`num_requests` requests of `workload`, reproducible for a given seed.

    Trace rows are sampled without replacement (with replacement only when the filtered trace has fewer
    rows than asked for). For traces with timestamps the chosen rows keep the trace's order and
    `arrival_time` is seconds after the first chosen row; random sampling thins the trace's arrival
    rate by num_requests / rows, while `contiguous=True` takes a window of consecutive rows at a seeded
    random start and so keeps the trace's real rate and burstiness.
    """
    if workload.kind == "multi-round":
        raise ValueError(f"workload {workload.spec!r} is a set of conversations: use sample_conversations")
    if workload.kind == "shared-prefix":
        return _sample_shared_prefix(workload, num_requests, seed, vocab_size, max_model_len)
    if num_requests <= 0:
        raise ValueError(f"num_requests must be positive, got {num_requests}")
    if vocab_size < 2 * TOKEN_ID_MARGIN + 1:
        raise ValueError(f"vocab_size must be at least {2 * TOKEN_ID_MARGIN + 1}, got {vocab_size}")
    if max_model_len is not None and max_model_len <= 0:
        raise ValueError(f"max_model_len must be positive, got {max_model_len}")
    rng = np.random.default_rng(seed)
    arrivals: list[float | None] = [None] * num_requests
    if workload.kind == "constant":
        n_in, n_out = workload.input_len, workload.output_len
        if max_model_len is not None and n_in + n_out > max_model_len:
            raise ValueError(f"workload {workload.spec!r}: IN + OUT = {n_in + n_out} exceeds "
                             f"max_model_len {max_model_len}")
        input_lens, output_lens = [n_in] * num_requests, [n_out] * num_requests
    elif workload.kind == "trace":
        rows = load_trace(workload.path)
        kept = filter_rows(rows, max_model_len)
        if not kept:
            raise ValueError(f"workload {workload.spec!r}: no row of {workload.path} passes the filter "
                             f"(0 < input <= {MAX_INPUT_TOKENS}, 0 < output <= {MAX_OUTPUT_TOKENS}, "
                             f"input + output <= max_model_len {max_model_len})")
        chosen = _choose_rows(rng, len(kept), num_requests, contiguous, workload.spec)
        if rows.timestamps is not None:
            chosen = sorted(chosen)
        indices = [kept[j] for j in chosen]
        input_lens = [rows.input_lens[i] for i in indices]
        output_lens = [rows.output_lens[i] for i in indices]
        if rows.timestamps is not None:
            first = rows.timestamps[indices[0]]
            arrivals = [rows.timestamps[i] - first for i in indices]
    else:
        raise ValueError(f"workload kind must be 'constant' or 'trace', got {workload.kind!r}")
    low, high = TOKEN_ID_MARGIN, vocab_size - TOKEN_ID_MARGIN
    ids = rng.integers(low, high, size=sum(input_lens), dtype=np.int64)
    requests = []
    start = 0
    for n_in, n_out, arrival in zip(input_lens, output_lens, arrivals):
        requests.append(BenchRequest(prompt_token_ids=ids[start:start + n_in].tolist(),
                                     output_len=n_out, arrival_time=arrival))
        start += n_in
    return requests


def _choose_rows(rng: np.random.Generator, num_rows: int, num_requests: int, contiguous: bool,
                 spec: str) -> list[int]:
    if contiguous:
        if num_requests > num_rows:
            raise ValueError(f"workload {spec!r}: a contiguous window of {num_requests} requests needs "
                             f"that many rows, the filtered trace has {num_rows}")
        first = int(rng.integers(0, num_rows - num_requests + 1))
        return list(range(first, first + num_requests))
    replace = num_requests > num_rows
    return rng.choice(num_rows, size=num_requests, replace=replace).tolist()


# ---- prefix-sharing workloads -------------------------------------------------------------------------
@dataclass(frozen=True)
class ConversationTurn:
    """One turn of a multi-round conversation."""

    user_token_ids: list[int]
    """The turn's new user tokens (random ids, seeded)."""
    output_len: int
    """Exact number of tokens to generate (ignore_eos)."""
    answer_token_ids: list[int]
    """A stand-in answer of output_len random ids, for clients that do not get the generated ids back
    (the next turn then carries these instead of the real answer)."""


@dataclass(frozen=True)
class Conversation:
    """Turns run one after the other; turn k's prompt is every earlier prompt and answer, then its own
    user tokens."""

    turns: list[ConversationTurn]
    """At least one turn."""

    def prompt_lens(self) -> list[int]:
        """Prompt tokens of each turn (the answers have their exact lengths)."""
        lens, history = [], 0
        for turn in self.turns:
            lens.append(history + len(turn.user_token_ids))
            history = lens[-1] + turn.output_len
        return lens


def _parse_int(spec: str, name: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"workload {spec!r}: {name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"workload {spec!r}: {name} must be at least {minimum}, got {value}")
    return value


def _parse_shared_prefix(spec: str) -> Workload:
    parts = spec.split(":")
    if len(parts) not in (4, 5) or parts[0] != "shared-prefix":
        raise ValueError(f"workload {spec!r}: expected shared-prefix:SYS:UNIQUE:OUT[:GROUPS], "
                         "e.g. shared-prefix:1024:128:128")
    names = ("SYS", "UNIQUE", "OUT", "GROUPS")
    sys_len, unique, out, *groups = (_parse_int(spec, n, t, 1) for n, t in zip(names, parts[1:]))
    return Workload(spec=spec, kind="shared-prefix", input_len=unique, output_len=out, prefix_len=sys_len,
                    num_groups=groups[0] if groups else 1)


def _parse_multi_round(spec: str, trace_dir: str | Path | None) -> Workload:
    rest = spec[len("multi-round"):]
    if not rest.startswith(":") or len(rest) == 1:
        raise ValueError(f"workload {spec!r}: expected multi-round:TRACE[:ROUNDS], e.g. multi-round:sharegpt:4")
    trace, rounds = rest[1:], DEFAULT_ROUNDS
    head, _, tail = trace.rpartition(":")
    if head and tail.strip().lstrip("-").isdigit():
        trace, rounds = head, _parse_int(spec, "ROUNDS", tail, 1)
    if trace not in NAMED_TRACES and not trace.lower().endswith(".csv"):
        raise ValueError(f"workload {spec!r}: TRACE must be splitwise, lmsys, sharegpt or a PATH.csv, got {trace!r}")
    base = parse_workload(trace, trace_dir)
    return Workload(spec=spec, kind="multi-round", path=base.path, rounds=rounds)


def _check_sampling_args(num: int, what: str, vocab_size: int, max_model_len: int | None) -> None:
    if num <= 0:
        raise ValueError(f"{what} must be positive, got {num}")
    if vocab_size < 2 * TOKEN_ID_MARGIN + 1:
        raise ValueError(f"vocab_size must be at least {2 * TOKEN_ID_MARGIN + 1}, got {vocab_size}")
    if max_model_len is not None and max_model_len <= 0:
        raise ValueError(f"max_model_len must be positive, got {max_model_len}")


def _random_ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    return rng.integers(TOKEN_ID_MARGIN, vocab_size - TOKEN_ID_MARGIN, size=n, dtype=np.int64).tolist()


def _sample_shared_prefix(workload: Workload, num_requests: int, seed: int, vocab_size: int,
                          max_model_len: int | None) -> list[BenchRequest]:
    _check_sampling_args(num_requests, "num_requests", vocab_size, max_model_len)
    total = workload.prefix_len + workload.input_len + workload.output_len
    if max_model_len is not None and total > max_model_len:
        raise ValueError(f"workload {workload.spec!r}: SYS + UNIQUE + OUT = {total} exceeds max_model_len "
                         f"{max_model_len}")
    rng = np.random.default_rng(seed)
    systems = [_random_ids(rng, workload.prefix_len, vocab_size) for _ in range(workload.num_groups)]
    return [BenchRequest(prompt_token_ids=systems[i % len(systems)] + _random_ids(rng, workload.input_len, vocab_size),
                         output_len=workload.output_len) for i in range(num_requests)]


def sample_conversations(workload: Workload, num_conversations: int, seed: int, vocab_size: int,
                         max_model_len: int | None) -> list[Conversation]:
    """`num_conversations` conversations of a multi-round workload, reproducible for a given seed.

    Each turn takes one trace row (sampled with replacement from the filtered rows): its ContextTokens
    as the turn's new user tokens, its GeneratedTokens as the answer length. A conversation ends early
    at the turn whose prompt + answer would exceed max_model_len (its first turn always fits)."""
    if workload.kind != "multi-round":
        raise ValueError(f"workload {workload.spec!r} is not multi-round: use sample_requests")
    _check_sampling_args(num_conversations, "num_conversations", vocab_size, max_model_len)
    rows = load_trace(workload.path)
    kept = filter_rows(rows, max_model_len)
    if not kept:
        raise ValueError(f"workload {workload.spec!r}: no row of {workload.path} passes the filter")
    rng = np.random.default_rng(seed)
    conversations = []
    for _ in range(num_conversations):
        picks = rng.choice(len(kept), size=workload.rounds, replace=True).tolist()
        turns, context = [], 0
        for j in picks:
            n_in, n_out = rows.input_lens[kept[j]], rows.output_lens[kept[j]]
            if turns and max_model_len is not None and context + n_in + n_out > max_model_len:
                break
            turns.append(ConversationTurn(_random_ids(rng, n_in, vocab_size), n_out,
                                          _random_ids(rng, n_out, vocab_size)))
            context += n_in + n_out
        conversations.append(Conversation(turns))
    return conversations
