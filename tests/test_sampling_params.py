import pytest

from nanoflow.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.is_greedy and not p.needs_penalties and p.max_stop_len == 0


def test_stop_is_normalized_to_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop=["a", "bcd"]).max_stop_len == 3
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_ints_are_accepted_for_float_fields():
    p = SamplingParams(temperature=0, top_p=1, presence_penalty=1)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert isinstance(p.presence_penalty, float)


@pytest.mark.parametrize("temperature, greedy", [(0.0, True), (1e-6, True), (1e-5, False), (0.7, False)])
def test_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


@pytest.mark.parametrize("kwargs", [dict(presence_penalty=0.1), dict(frequency_penalty=-0.1),
                                    dict(repetition_penalty=1.1)])
def test_needs_penalties(kwargs):
    assert SamplingParams(**kwargs).needs_penalties


@pytest.mark.parametrize("kwargs", [
    dict(top_p=1.0), dict(top_k=-1), dict(top_k=0), dict(top_k=5), dict(min_p=1.0), dict(logprobs=0),
    dict(logprobs=20), dict(max_tokens=None), dict(max_tokens=None, min_tokens=100), dict(temperature=0.0),
    dict(repetition_penalty=0.5), dict(presence_penalty=-2.0), dict(frequency_penalty=2.0), dict(seed=0),
    dict(seed=2**64 - 1), dict(min_tokens=16, max_tokens=16),
])
def test_edge_values_are_valid(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 1.0),
    ("min_p", -0.01), ("min_p", 1.5),
    ("seed", 1.0), ("seed", 2**64),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", 5), ("stop", ["ok", 3]),
    ("stop_token_ids", 5), ("stop_token_ids", [1, -1]), ("stop_token_ids", ["a"]),
    ("ignore_eos", 1), ("skip_special_tokens", "yes"), ("include_stop_str_in_output", None),
])
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_raises():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=17, max_tokens=16)
