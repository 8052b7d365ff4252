import math

import pytest
import torch

from nanoflow.engine.sampler import Sampler, SamplingBatch, make_generator
from nanoflow.sampling_params import SamplingParams

EOS = 0


def batch_of(params, outputs=None, prompts=None, generators=None):
    r = len(params)
    return SamplingBatch(
        params=list(params),
        prompt_token_ids=prompts if prompts is not None else [[1, 2, 3]] * r,
        output_token_ids=outputs if outputs is not None else [[] for _ in range(r)],
        generators=generators if generators is not None else [None] * r,
    )


def seeded_generators(params):
    return [make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]


def draw(logits_row, params, rows, sampler=None):
    """Samples `rows` copies of one logits row with the same params; returns the token ids."""
    sampler = sampler or Sampler([EOS], seed=1)
    logits = logits_row.unsqueeze(0).repeat(rows, 1)
    return sampler(logits, batch_of([params] * rows)).token_ids


def log_probs(*probs):
    return torch.tensor(probs, dtype=torch.float32).log()


@pytest.fixture
def random_logits():
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_takes_argmax(random_logits):
    out = Sampler([EOS])(random_logits, batch_of([SamplingParams(temperature=0.0)] * 8))
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, random_logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None and out.top_token_ids is None


def test_greedy_and_sampled_rows_mix(random_logits):
    params = [SamplingParams(temperature=0.0 if i % 2 else 5.0) for i in range(8)]
    tokens = Sampler([EOS])(random_logits, batch_of(params)).token_ids
    greedy = random_logits.argmax(-1)
    assert torch.equal(tokens[1::2], greedy[1::2])


def test_high_temperature_sampling_is_not_greedy():
    # Guards the other tests: without top_k / top_p / min_p, a flat-ish row gives many tokens.
    tokens = draw(torch.arange(16.0) * 0.1, SamplingParams(temperature=2.0), 2000)
    assert len(tokens.unique()) == 16


def test_top_k_one_is_argmax_even_at_high_temperature():
    logits = torch.randn(32, generator=torch.Generator().manual_seed(3))
    tokens = draw(logits, SamplingParams(temperature=50.0, top_k=1), 500)
    assert (tokens == logits.argmax()).all()


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.arange(20.0) * 0.01  # nearly uniform: every kept token shows up
    tokens = draw(logits, SamplingParams(temperature=1.0, top_k=3), 3000)
    assert set(tokens.tolist()) == {17, 18, 19}


@pytest.mark.parametrize("top_k", [0, -1, 1000])
def test_top_k_off_or_larger_than_vocab(top_k):
    tokens = draw(torch.zeros(10), SamplingParams(top_k=top_k), 2000)
    assert len(tokens.unique()) == 10


def test_small_top_p_keeps_only_the_top_token():
    logits = torch.randn(32, generator=torch.Generator().manual_seed(4))
    tokens = draw(logits, SamplingParams(temperature=3.0, top_p=0.01), 500)
    assert (tokens == logits.argmax()).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = log_probs(0.05, 0.5, 0.15, 0.3)
    tokens = draw(logits, SamplingParams(top_p=0.75), 3000)
    assert set(tokens.tolist()) == {1, 3}
    tokens = draw(logits, SamplingParams(top_p=0.85), 3000)
    assert set(tokens.tolist()) == {1, 2, 3}


def test_min_p_drops_tokens_below_fraction_of_top():
    logits = log_probs(0.15, 0.5, 0.05, 0.3)
    tokens = draw(logits, SamplingParams(min_p=0.4), 3000)  # threshold 0.2
    assert set(tokens.tolist()) == {1, 3}
    tokens = draw(logits, SamplingParams(min_p=0.2), 3000)  # threshold 0.1
    assert set(tokens.tolist()) == {0, 1, 3}


def test_top_k_top_p_min_p_apply_per_row():
    logits = log_probs(0.1, 0.4, 0.2, 0.3).repeat(3000, 1)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.65), SamplingParams()] * 1000
    tokens = Sampler([EOS], seed=2)(logits, batch_of(params)).token_ids
    assert set(tokens[0::3].tolist()) == {1}
    assert set(tokens[1::3].tolist()) == {1, 3}
    assert set(tokens[2::3].tolist()) == {0, 1, 2, 3}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_shapes_the_distribution(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    tokens = draw(logits, SamplingParams(temperature=temperature), n)
    counts = torch.bincount(tokens, minlength=5).double()
    want = torch.softmax(logits.double() / temperature, -1)
    # 4 degrees of freedom: the 99.9% quantile is 18.5. Other temperatures are far off.
    assert chi_square(counts, want) < 18.5
    for other in (0.5, 1.0, 2.0):
        if other != temperature:
            assert chi_square(counts, torch.softmax(logits.double() / other, -1)) > 100


def test_repetition_penalty_divides_positive_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0, -5.0]])
    greedy = SamplingParams(temperature=0.0)
    sampler = Sampler([EOS])
    assert sampler(logits, batch_of([greedy], prompts=[[0]])).token_ids.item() == 0
    penalized = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert sampler(logits, batch_of([penalized], prompts=[[0]])).token_ids.item() == 1  # from the prompt
    assert sampler(logits, batch_of([penalized], prompts=[[3]], outputs=[[0]])).token_ids.item() == 1
    assert sampler(logits, batch_of([penalized], prompts=[[2]])).token_ids.item() == 0


def test_repetition_penalty_multiplies_negative_logits():
    logits = torch.tensor([[-5.0, -1.0, -1.1]])
    p = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler([EOS])(logits, batch_of([p], prompts=[[1]])).token_ids.item() == 2


def test_repetition_penalty_below_one_favours_seen_tokens():
    logits = torch.tensor([[2.0, 1.9]])
    p = SamplingParams(temperature=0.0, repetition_penalty=0.9)
    assert Sampler([EOS])(logits, batch_of([p], prompts=[[1]])).token_ids.item() == 1


def test_presence_penalty_counts_output_tokens_once():
    logits = torch.tensor([[1.0, 0.8, -3.0]])
    p = SamplingParams(temperature=0.0, presence_penalty=0.5)
    sampler = Sampler([EOS])
    assert sampler(logits, batch_of([p], outputs=[[0]])).token_ids.item() == 1
    # The prompt does not count for presence / frequency.
    assert sampler(logits, batch_of([p], prompts=[[0]], outputs=[[2]])).token_ids.item() == 0
    # Presence does not grow with occurrences: 3 x 0.1 would flip it, 0.1 once does not.
    small = SamplingParams(temperature=0.0, presence_penalty=0.1)
    assert sampler(logits, batch_of([small], outputs=[[0, 0, 0]])).token_ids.item() == 0


def test_frequency_penalty_grows_with_occurrences():
    logits = torch.tensor([[1.0, 0.8, -3.0]])
    p = SamplingParams(temperature=0.0, frequency_penalty=0.15)
    sampler = Sampler([EOS])
    assert sampler(logits, batch_of([p], outputs=[[0]])).token_ids.item() == 0
    assert sampler(logits, batch_of([p], outputs=[[0, 2, 0]])).token_ids.item() == 1


def test_negative_presence_penalty_rewards_repeats():
    logits = torch.tensor([[1.0, 0.8]])
    p = SamplingParams(temperature=0.0, presence_penalty=-0.5)
    assert Sampler([EOS])(logits, batch_of([p], outputs=[[1]])).token_ids.item() == 1


def test_penalties_only_touch_their_rows_and_ignore_out_of_vocab_ids():
    # -1 is the engine's placeholder for a token still being sampled (async scheduling).
    logits = torch.tensor([[2.0, 1.9, 0.0]] * 3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.0, frequency_penalty=1.0)]
    out = Sampler([EOS])(logits, batch_of(params, prompts=[[0, 99]] * 3, outputs=[[0, 1000, -1]] * 3))
    assert out.token_ids.tolist() == [0, 1, 1]


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    sampler = Sampler([EOS])
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])
    assert sampler(logits, batch_of([p], outputs=[[3]])).token_ids.item() == 2
    assert sampler(logits, batch_of([p], outputs=[[3, 3]])).token_ids.item() == EOS
    # ignore_eos does not lift min_tokens' mask.
    q = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler(logits, batch_of([q])).token_ids.item() == 1


def test_min_tokens_masks_every_eos_id_when_sampling():
    logits = torch.tensor([10.0, 10.0, 0.0, 0.0])
    tokens = draw(logits, SamplingParams(min_tokens=1), 500, sampler=Sampler([0, 1], seed=5))
    assert set(tokens.tolist()) == {2, 3}


def test_seeded_rows_are_reproducible_across_batches():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    seeded = SamplingParams(temperature=1.5, seed=1234)
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, seed=7)]

    def run(rows, position, steps=5, sampler_seed=0):
        """Tokens of the seeded request placed at `position` among `rows` requests."""
        params = [others[i % 2] for i in range(rows)]
        params[position] = seeded
        gens = seeded_generators(params)
        sampler = Sampler([EOS], seed=sampler_seed)
        got = []
        for _ in range(steps):
            x = logits[:1].repeat(rows, 1)
            x[torch.arange(rows) != position] = torch.randn(rows - 1, 50)
            got.append(sampler(x, batch_of(params, generators=gens)).token_ids[position].item())
        return got

    reference = run(1, 0)
    assert run(4, 2) == reference
    assert run(6, 5, sampler_seed=99) == reference


def test_different_seeds_give_different_tokens():
    logits = torch.zeros(1000)

    def tokens(seed):
        p = SamplingParams(seed=seed)
        return Sampler([EOS])(logits.unsqueeze(0), batch_of([p], generators=seeded_generators([p]))).token_ids

    assert torch.equal(tokens(1), tokens(1))
    assert not torch.equal(torch.stack([tokens(s) for s in range(4)]), tokens(0).repeat(4, 1))


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(64, 1000)
    params = [SamplingParams()] * 64
    a = Sampler([EOS], seed=3)(logits, batch_of(params)).token_ids
    b = Sampler([EOS], seed=3)(logits, batch_of(params)).token_ids
    c = Sampler([EOS], seed=4)(logits, batch_of(params)).token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_logprobs_are_the_raw_log_softmax(random_logits):
    params = [SamplingParams(logprobs=3, temperature=0.7, repetition_penalty=1.5, presence_penalty=1.0),
              SamplingParams(logprobs=0, temperature=0.0, top_k=2), SamplingParams()] + \
             [SamplingParams(temperature=2.0, top_p=0.5)] * 5
    out = Sampler([EOS])(random_logits, batch_of(params, outputs=[[5, 6]] * 8))
    want = torch.log_softmax(random_logits, -1)
    assert torch.allclose(out.logprobs, want.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == (8, 3) and out.top_token_ids.shape == (8, 3)
    top = want.topk(3, -1)
    assert torch.allclose(out.top_logprobs, top.values)
    assert torch.equal(out.top_token_ids, top.indices)


def test_logprobs_zero_returns_only_the_chosen_token():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = Sampler([EOS])(logits, batch_of([SamplingParams(temperature=0.0, logprobs=0)]))
    assert out.top_logprobs is None and out.top_token_ids is None
    assert math.isclose(out.logprobs.item(), torch.log_softmax(logits, -1)[0, 2].item(), rel_tol=1e-6)


def test_low_precision_logits_are_accepted():
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    out = Sampler([EOS])(logits, batch_of([SamplingParams(temperature=0.0, logprobs=2)] * 4))
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.logprobs.dtype == torch.float32


def test_sampler_does_not_modify_the_logits(random_logits):
    before = random_logits.clone()
    params = [SamplingParams(top_k=2, top_p=0.5, min_p=0.1, repetition_penalty=1.3, min_tokens=3,
                             temperature=0.5)] * 8
    Sampler([EOS])(random_logits, batch_of(params, outputs=[[1, 2]] * 8))
    assert torch.equal(random_logits, before)


@pytest.mark.parametrize("field", ["params", "prompt_token_ids", "output_token_ids", "generators"])
def test_batch_row_mismatch_raises(field, random_logits):
    batch = batch_of([SamplingParams()] * 8)
    setattr(batch, field, getattr(batch, field)[:7])
    with pytest.raises(ValueError, match=field):
        Sampler([EOS])(random_logits, batch)
