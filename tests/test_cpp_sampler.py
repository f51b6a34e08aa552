"""The fused C++ PAD sampler against the torch one (padengine/layers/sampler.py) on fresh random rows:
float32 and bfloat16 logits, top_k 1 / 10 / 0 (whole vocabulary) / past the vocabulary / above the
scan's limit, greedy and sampled rows, reward vocabularies wider than the base's, no reward model, top-p
and min-p, alternatives and max_k. Tokens must be equal, log-probabilities close, alternatives equal as
sets. Exact ties, which torch leaves in no particular order, go to the lowest token id.
"""
import pytest
import torch

from padengine.kernels import get_ops
from padengine.layers.sampler import pad_sample


@pytest.fixture(scope="module")
def cpp_sample():
    return get_ops("cpp").sample


def distinct_bf16(n: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    """[n, vocab] bfloat16 logits without ties inside a row (bf16 rounding of random floats ties often, and
    the torch sampler orders equal values arbitrarily): distinct values of [-8, 8] in random order."""
    pool = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    pool = pool[torch.isfinite(pool) & (pool.float().abs() <= 8)]
    return torch.stack([pool[torch.randperm(len(pool), generator=g)[:vocab]] for _ in range(n)])


def random_rows(n, vocab, dtype, reward_extra=7, with_reward=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bfloat16:
        base, reward = distinct_bf16(n, vocab, g), distinct_bf16(n, vocab + reward_extra, g)
    else:
        base, reward = torch.randn(n, vocab, generator=g) * 3, torch.randn(n, vocab + reward_extra, generator=g) * 3
    pick = lambda *values: torch.tensor(values)[torch.randint(len(values), (n,), generator=g)]
    top_k = pick(1, 10, 0, vocab + 5, 3, 200)
    weight = pick(0.0, 0.5, 1.5, -0.5, 3.0).float()
    temperature = pick(0.0, 0.0, 0.7, 1.0, 1.5).float()
    seed_ = torch.randint(-2 ** 62, 2 ** 62, (n,), generator=g)
    position = torch.randint(0, 5000, (n,), generator=g)
    return base, reward if with_reward else None, top_k, weight, temperature, seed_, position


def assert_same(got, want):
    assert torch.equal(got.tokens, want.tokens), (got.tokens != want.tokens).nonzero()
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=2e-5, rtol=1e-5)
    for i in range(len(want.tokens)):
        ref = {int(t): float(lp) for t, lp in zip(want.top_ids[i], want.top_logprobs[i]) if lp != float("-inf")}
        alt = {int(t): float(lp) for t, lp in zip(got.top_ids[i], got.top_logprobs[i]) if lp != float("-inf")}
        assert alt.keys() == ref.keys(), i
        assert all(abs(alt[t] - ref[t]) < 2e-5 for t in ref), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [300, 5000])
@pytest.mark.parametrize("with_reward", [True, False])
def test_matches_torch_sampler(cpp_sample, dtype, vocab, with_reward):
    args = random_rows(64, vocab, dtype, with_reward=with_reward, seed=vocab)
    assert_same(cpp_sample(*args, num_top=5), pad_sample(*args, num_top=5))


@pytest.mark.parametrize("filters", ["top_p", "min_p", "both"])
def test_filters_and_alternatives_match_torch(cpp_sample, filters):
    n = 96
    args = random_rows(n, 2000, torch.float32, seed=len(filters))
    g = torch.Generator().manual_seed(3)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.3])[torch.randint(4, (n,), generator=g)]
    min_p = torch.tensor([0.0, 0.05, 0.3])[torch.randint(3, (n,), generator=g)]
    kw = dict(top_p=top_p if filters != "min_p" else None, min_p=min_p if filters != "top_p" else None, num_top=20)
    assert_same(cpp_sample(*args, **kw), pad_sample(*args, **kw))


def test_max_k_bounds_the_candidates_as_in_torch(cpp_sample):
    base, reward, top_k, *rest = random_rows(32, 1000, torch.float32, seed=7)
    top_k = torch.where(top_k > 10, 10, top_k).clamp(min=1)
    args = (base, reward, top_k, *rest)
    assert_same(cpp_sample(*args, max_k=10, num_top=3), pad_sample(*args, max_k=10, num_top=3))
    assert_same(cpp_sample(*args, max_k=4), pad_sample(*args, max_k=4))     # max_k below some rows' k


def test_ties_go_to_the_lowest_token_id(cpp_sample):
    """Equal base logits at the top and at the top-k cut: the lower ids are the candidates and the choice."""
    base = torch.zeros(2, 50)
    base[:, [7, 3, 30]] = 5.0                       # three-way tie for the best
    base[1, [11, 40, 20]] = 4.0                     # row 1, k = 5: only 11 and 20 of the 4.0s get in
    per_row = lambda v, dt=torch.float32: torch.full((2,), v, dtype=dt)
    out = cpp_sample(base, None, torch.tensor([0, 5]), per_row(0.0), per_row(0.0), per_row(0, torch.long),
                     per_row(0, torch.long), num_top=5)
    assert out.tokens.tolist() == [3, 3]
    assert set(out.top_ids[1].tolist()) == {3, 7, 30, 11, 20}


def test_empty_batch(cpp_sample):
    out = cpp_sample(torch.zeros(0, 30), None, *(torch.zeros(0, dtype=dt) for dt in
                                                  (torch.long, torch.float, torch.float, torch.long, torch.long)),
                     num_top=2)
    assert out.tokens.shape == (0,) and out.top_ids.shape == (0, 2)
