"""Workload specs, trace loading / filtering, and seeded request sampling (nanoflow.bench.workloads)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nanoflow.bench.workloads import (
    MAX_INPUT_TOKENS, MAX_OUTPUT_TOKENS, NAMED_TRACES, PACKAGED_TRACE_DIR, PACKAGED_TRACES, TOKEN_ID_MARGIN, TRACE_DIR_ENV,
    Workload, default_trace_dirs, filter_rows, find_trace_file, load_trace, parse_workload, sample_requests)

VOCAB = 1000


def write_csv(path: Path, rows: list[tuple], header: str = "TIMESTAMP,ContextTokens,GeneratedTokens") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


# ---- spec parsing ---------------------------------------------------------------------------------
def test_constant_spec():
    w = parse_workload("constant:512:1024")
    assert (w.kind, w.input_len, w.output_len, w.path) == ("constant", 512, 1024, None)
    assert parse_workload("  constant:1:2 ").spec == "constant:1:2"


@pytest.mark.parametrize("spec, fragment", [
    ("constant:512", "constant:IN:OUT"),
    ("constant:1:2:3", "constant:IN:OUT"),
    ("constant:a:3", "IN must be an integer"),
    ("constant:3:x", "OUT must be an integer"),
    ("constant:0:3", "IN must be positive"),
    ("constant:3:-1", "OUT must be positive"),
    ("random", "constant:IN:OUT, splitwise"),
    ("", "workload must be one of"),
])
def test_malformed_spec(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_workload(spec)


def test_missing_named_trace_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        parse_workload("lmsys", trace_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "nanoflow" / "lmsys.csv") in message
    assert str(tmp_path / "lmsys.csv") in message
    assert "--trace-dir" in message


def test_missing_csv_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        parse_workload(str(tmp_path / "nope.csv"))


def test_named_trace_nested_and_flat_layouts(tmp_path):
    nested = write_csv(tmp_path / "a" / "nanoflow" / "sharegpt.csv", [("XXX", 5, 6)])
    flat = write_csv(tmp_path / "b" / "sharegpt.csv", [("XXX", 5, 6)])
    assert parse_workload("sharegpt", trace_dir=tmp_path / "a").path == nested
    assert parse_workload("sharegpt", trace_dir=tmp_path / "b").path == flat
    assert parse_workload("splitwise", trace_dir=write_csv(
        tmp_path / "c" / "AzureLLMInferenceTrace_conv.csv", [("XXX", 5, 6)]).parent).kind == "trace"


def test_trace_dir_from_environment(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "lmsys.csv", [("XXX", 5, 6)])
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path))
    assert default_trace_dirs()[0] == tmp_path
    assert find_trace_file(NAMED_TRACES["lmsys"]) == path
    assert parse_workload("lmsys").path == path


def test_default_search_order_without_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(TRACE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_trace_dirs() == [PACKAGED_TRACE_DIR]
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path))
    assert default_trace_dirs() == [tmp_path, PACKAGED_TRACE_DIR]  # the environment's folder first


@pytest.mark.parametrize("name", PACKAGED_TRACES)
def test_named_traces_come_from_the_package(name, monkeypatch, tmp_path):
    """An installed package has no sibling ../shared folder: the shipped traces are inside it."""
    monkeypatch.delenv(TRACE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert parse_workload(name).path == PACKAGED_TRACE_DIR / f"{name}.csv"
    # The environment's folder and --trace-dir still come first.
    own = write_csv(tmp_path / "own" / NAMED_TRACES[name], [("XXX", 5, 6)])
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path / "own"))
    assert parse_workload(name).path == own
    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path / "empty"))
    assert parse_workload(name).path == PACKAGED_TRACE_DIR / f"{name}.csv"
    with pytest.raises(FileNotFoundError, match="--trace-dir"):  # an explicit folder is the only one read
        parse_workload(name, trace_dir=tmp_path / "empty")


def test_packaged_traces_name_their_sources_and_licences():
    sources = (PACKAGED_TRACE_DIR / "SOURCES.md").read_text()
    for name in NAMED_TRACES:
        assert f"{name}.csv" in sources
    assert "CC-BY 4.0" in sources and "Attribution" in sources and "Apache-2.0" in sources
    assert "github.com/Azure/AzurePublicDataset" in sources and "github.com/efeslab/Nanoflow" in sources
    for name in PACKAGED_TRACES:  # sha256 recorded there matches the shipped bytes
        digest = hashlib.sha256((PACKAGED_TRACE_DIR / f"{name}.csv").read_bytes()).hexdigest()
        assert digest in sources, name


def test_package_data_covers_every_data_file():
    """pyproject's package-data must match every non-Python file in the package, or a
    non-editable install (a wheel) silently lacks it (it lacked the built-in plans once)."""
    import fnmatch
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    repo = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["nanoflow"]
    package = repo / "nanoflow"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(d.startswith("bench/traces/") for d in data) and any(d.startswith("pipeline/plans/") for d in data)
    missing = [d for d in data if not any(fnmatch.fnmatch(d, pat) for pat in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


# ---- trace files ----------------------------------------------------------------------------------
def test_load_trace_columns_and_timestamps(tmp_path):
    path = write_csv(tmp_path / "t.csv", [("2023-11-16 18:15:46.6805900", 374, 44),
                                          ("2023-11-16 18:15:50.9951690", 396, 109),
                                          ("2023-11-17 00:00:00", 1, 2)])
    rows = load_trace(path)
    assert rows.input_lens == [374, 396, 1] and rows.output_lens == [44, 109, 2]
    assert rows.timestamps[1] - rows.timestamps[0] == pytest.approx(4.314579, abs=1e-6)
    assert rows.timestamps[2] - rows.timestamps[0] == pytest.approx(5 * 3600 + 44 * 60 + 13.31941, abs=1e-6)


def test_placeholder_or_missing_timestamps_mean_no_arrival_times(tmp_path):
    assert load_trace(write_csv(tmp_path / "x.csv", [("XXX", 3, 4)])).timestamps is None
    no_column = write_csv(tmp_path / "y.csv", [(3, 4)], header="ContextTokens,GeneratedTokens")
    rows = load_trace(no_column)
    assert rows.timestamps is None and rows.input_lens == [3]
    assert load_trace(write_csv(tmp_path / "z.csv", [(0.5, 3, 4), (2.0, 1, 1)])).timestamps == [0.5, 2.0]


def test_malformed_trace_files(tmp_path):
    with pytest.raises(ValueError, match="missing column.*GeneratedTokens"):
        load_trace(write_csv(tmp_path / "a.csv", [("XXX", 3)], header="TIMESTAMP,ContextTokens"))
    with pytest.raises(ValueError, match="line 3"):
        load_trace(write_csv(tmp_path / "b.csv", [("XXX", 3, 4), ("XXX", "many", 4)]))


def test_filter_drops_long_and_empty_rows(tmp_path):
    rows = load_trace(write_csv(tmp_path / "t.csv", [
        ("XXX", 100, 50),                                  # 0 kept
        ("XXX", MAX_INPUT_TOKENS + 1, 10),                 # 1 input too long
        ("XXX", 100, MAX_OUTPUT_TOKENS + 1),               # 2 output too long
        ("XXX", 0, 5),                                     # 3 empty prompt
        ("XXX", 5, 0),                                     # 4 no output
        ("XXX", MAX_INPUT_TOKENS, MAX_OUTPUT_TOKENS),      # 5 kept without a context limit (boundary)
        ("XXX", 7, 9),                                     # 6 kept
    ]))
    assert filter_rows(rows, None) == [0, 5, 6]
    assert filter_rows(rows, 4000) == [0, 6]               # 3072 + 1024 > 4000


# ---- sampling -------------------------------------------------------------------------------------
def test_constant_requests_are_exact_and_seeded():
    w = parse_workload("constant:16:8")
    a = sample_requests(w, 5, seed=3, vocab_size=VOCAB, max_model_len=2048)
    b = sample_requests(w, 5, seed=3, vocab_size=VOCAB, max_model_len=2048)
    c = sample_requests(w, 5, seed=4, vocab_size=VOCAB, max_model_len=2048)
    assert a == b and a != c
    assert all(len(r.prompt_token_ids) == 16 and r.output_len == 8 and r.arrival_time is None for r in a)
    assert len({tuple(r.prompt_token_ids) for r in a}) == 5
    ids = [t for r in a for t in r.prompt_token_ids]
    assert all(isinstance(t, int) and TOKEN_ID_MARGIN <= t < VOCAB - TOKEN_ID_MARGIN for t in ids)


def test_constant_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="max_model_len"):
        sample_requests(parse_workload("constant:100:29"), 1, 0, VOCAB, max_model_len=128)
    assert len(sample_requests(parse_workload("constant:100:28"), 1, 0, VOCAB, max_model_len=128)) == 1


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_requests=0), "num_requests"),
    (dict(vocab_size=20), "vocab_size"),
    (dict(max_model_len=0), "max_model_len"),
])
def test_sampling_argument_errors(kwargs, field):
    args = dict(workload=parse_workload("constant:2:2"), num_requests=1, seed=0, vocab_size=VOCAB,
                max_model_len=None) | kwargs
    with pytest.raises(ValueError, match=field):
        sample_requests(**args)


def _length_trace(tmp_path: Path, n: int, stamps: bool) -> Path:
    rows = [((f"2023-11-16 18:00:{i:02d}.5000000" if stamps else "XXX"), 10 + i, 100 + i) for i in range(n)]
    rows.append(("2023-11-16 18:59:00.0000000" if stamps else "XXX", 5000, 3))  # filtered out
    return write_csv(tmp_path / "t.csv", rows)


def test_trace_sampling_without_replacement_uses_only_kept_rows(tmp_path):
    w = parse_workload(str(_length_trace(tmp_path, 20, stamps=False)))
    reqs = sample_requests(w, 20, seed=1, vocab_size=VOCAB, max_model_len=None)
    pairs = sorted((len(r.prompt_token_ids), r.output_len) for r in reqs)
    assert pairs == [(10 + i, 100 + i) for i in range(20)]          # a permutation of the kept rows
    assert all(r.arrival_time is None for r in reqs)
    again = sample_requests(w, 20, seed=1, vocab_size=VOCAB, max_model_len=None)
    other = sample_requests(w, 20, seed=2, vocab_size=VOCAB, max_model_len=None)
    assert again == reqs
    assert [r.output_len for r in other] != [r.output_len for r in reqs]


def test_trace_sampling_with_replacement_when_short(tmp_path):
    w = parse_workload(str(_length_trace(tmp_path, 3, stamps=False)))
    reqs = sample_requests(w, 50, seed=0, vocab_size=VOCAB, max_model_len=None)
    assert len(reqs) == 50
    assert {r.output_len for r in reqs} == {100, 101, 102}


def test_trace_max_model_len_filter(tmp_path):
    w = parse_workload(str(_length_trace(tmp_path, 20, stamps=False)))
    reqs = sample_requests(w, 100, seed=0, vocab_size=VOCAB, max_model_len=120)
    assert {(len(r.prompt_token_ids), r.output_len) for r in reqs} == {(10 + i, 100 + i) for i in range(6)}
    with pytest.raises(ValueError, match="no row"):
        sample_requests(w, 1, seed=0, vocab_size=VOCAB, max_model_len=50)


def test_trace_timestamps_become_relative_arrival_times(tmp_path):
    w = parse_workload(str(_length_trace(tmp_path, 30, stamps=True)))
    reqs = sample_requests(w, 10, seed=5, vocab_size=VOCAB, max_model_len=None)
    arrivals = [r.arrival_time for r in reqs]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    # Row i was stamped at second i: the arrival gaps equal the gaps of the chosen rows' indices.
    rows = [r.output_len - 100 for r in reqs]
    assert arrivals == pytest.approx([float(i - rows[0]) for i in rows])


def test_contiguous_window_keeps_the_trace_rate(tmp_path):
    w = parse_workload(str(_length_trace(tmp_path, 30, stamps=True)))
    reqs = sample_requests(w, 8, seed=2, vocab_size=VOCAB, max_model_len=None, contiguous=True)
    assert [r.arrival_time for r in reqs] == pytest.approx([float(i) for i in range(8)])
    first = reqs[0].output_len
    assert [r.output_len for r in reqs] == list(range(first, first + 8))
    with pytest.raises(ValueError, match="contiguous"):
        sample_requests(w, 31, seed=2, vocab_size=VOCAB, max_model_len=None, contiguous=True)


def test_workload_describe(tmp_path):
    path = _length_trace(tmp_path, 2, stamps=False)
    assert parse_workload(str(path)).describe() == f"{path} (t.csv)"
    assert Workload(spec="constant:1:1", kind="constant", input_len=1, output_len=1).describe() == "constant:1:1"


# ---- the real traces (shipped in the package) ----------------------------------------------------
def _real_trace(name: str) -> Workload:
    return parse_workload(name, trace_dir=PACKAGED_TRACE_DIR)


def test_real_splitwise_trace():
    w = _real_trace("splitwise")
    rows = load_trace(w.path)
    assert len(rows.input_lens) == 19_366                    # traces/README.md
    assert len(filter_rows(rows, None)) == 17_563            # NanoFlow's filter, traces/README.md
    span = rows.timestamps[-1] - rows.timestamps[0]
    assert 3_400 < span < 3_600                              # 3,502 s
    reqs = sample_requests(w, 200, seed=0, vocab_size=128_256, max_model_len=8192)
    assert all(r.arrival_time is not None for r in reqs) and reqs[0].arrival_time == 0.0
    assert all(len(r.prompt_token_ids) <= MAX_INPUT_TOKENS and 0 < r.output_len <= MAX_OUTPUT_TOKENS for r in reqs)


@pytest.mark.parametrize("name", sorted(set(NAMED_TRACES) - set(PACKAGED_TRACES)))
def test_unshipped_traces_say_where_to_get_them(name, monkeypatch, tmp_path):
    """lmsys / sharegpt are not redistributed (their notes ask not to): a missing copy names the source."""
    monkeypatch.delenv(TRACE_DIR_ENV, raising=False)
    assert not (PACKAGED_TRACE_DIR / f"{name}.csv").exists()
    with pytest.raises(FileNotFoundError) as err:
        parse_workload(name)
    assert "github.com/efeslab/Nanoflow" in str(err.value) and "--trace-dir" in str(err.value)
