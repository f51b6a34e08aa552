"""The torch PAD sampler against the rule written out directly, and its sampling distribution."""
import math

import pytest
import torch

from padengine import Engine, SamplingParams
from padengine.kernels import get_ops
from padengine.layers.sampler import gumbel_from_hash, gumbel_noise


@pytest.fixture(params=["torch", "cpp"])
def pad_sample(request):
    """The torch sampler and the C++ one: both must follow the rule and its distribution."""
    return get_ops(request.param).sample


def rule(zb_row, zr_row, k, w):
    """score over the base top-k, straight from the definition, as {token: score}."""
    vals, cand = zb_row.topk(k)
    score = vals + w * (torch.log_softmax(zr_row[cand], -1) - torch.log_softmax(vals, -1))
    return dict(zip(cand.tolist(), score.tolist()))


def per_row(n, top_k, weight, temperature, seed, position=None):
    full = lambda v, dt: torch.full((n,), v, dtype=dt)
    pos = torch.arange(n) if position is None else full(position, torch.long)
    return (full(top_k, torch.long), full(weight, torch.float32), full(temperature, torch.float32),
            full(seed, torch.long), pos)


def test_greedy_matches_rule_with_mixed_rows(pad_sample):
    torch.manual_seed(0)
    zb, zr = torch.randn(6, 50) * 3, torch.randn(6, 64) * 3   # reward vocab padded wider
    top_k = torch.tensor([1, 5, 10, 0, 50, 70])
    weight = torch.tensor([0.0, 0.5, 1.5, 1.0, 3.0, -0.5])
    tokens, logprobs, *_ = pad_sample(zb, zr, top_k, weight, torch.zeros(6), torch.zeros(6, dtype=torch.long),
                                  torch.zeros(6, dtype=torch.long))
    for i in range(6):
        k = 50 if top_k[i] in (0, 70) else int(top_k[i])
        scores = rule(zb[i], zr[i], k, float(weight[i]))
        assert int(tokens[i]) == max(scores, key=scores.get)
        s = torch.tensor(list(scores.values()))
        assert logprobs[i].item() == pytest.approx(float(torch.log_softmax(s, 0).max()), abs=1e-5)


def test_no_reward_is_plain_top_k(pad_sample):
    zb = torch.randn(3, 40)
    tokens, *_ = pad_sample(zb, None, *per_row(3, 10, 1.0, 0.0, 0))
    assert tokens.tolist() == zb.argmax(-1).tolist()


@pytest.mark.parametrize("top_k,weight,temperature", [(8, 1.0, 0.7), (0, 0.0, 1.0), (5, 2.0, 1.5)])
def test_sampling_frequencies_follow_softmax(top_k, weight, temperature, pad_sample):
    """Chi-square goodness of fit over 20000 draws (one per position) from one fixed row."""
    torch.manual_seed(1)
    vocab, n = 30, 20000
    zb, zr = torch.randn(vocab) * 1.5, torch.randn(vocab) * 1.5
    tokens, *_ = pad_sample(zb.expand(n, vocab), zr.expand(n, vocab), *per_row(n, top_k, weight, temperature, 1234))
    scores = rule(zb, zr, top_k or vocab, weight)
    cand = list(scores)
    probs = torch.softmax(torch.tensor([scores[c] for c in cand], dtype=torch.float64) / temperature, 0)
    counts = torch.tensor([(tokens == c).sum().item() for c in cand], dtype=torch.float64)
    assert counts.sum() == n, "drew a token outside the candidate set"
    expected = probs * n
    keep = expected >= 5                       # pool rare candidates into one cell, as the test requires
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))
    assert p_value > 1e-3, f"chi2={chi2:.1f} dof={dof} p={p_value:.2e}"


def test_noise_is_finite_at_the_extreme_hashes():
    noise = gumbel_from_hash(torch.tensor([0, 1, 511, 512, 0xFFFFFE00, 0xFFFFFFFF]))
    assert torch.isfinite(noise).all() and noise[0] < noise[-1]


def test_noise_is_keyed_by_seed_position_and_token():
    ids = torch.arange(1000)[None, :]
    a = gumbel_noise(torch.tensor([7]), torch.tensor([3]), ids)
    assert torch.equal(a, gumbel_noise(torch.tensor([7]), torch.tensor([3]), ids))
    assert not torch.equal(a, gumbel_noise(torch.tensor([8]), torch.tensor([3]), ids))
    assert not torch.equal(a, gumbel_noise(torch.tensor([7]), torch.tensor([4]), ids))
    assert torch.isfinite(a).all()
    assert abs(a.mean().item() - 0.5772) < 0.1           # the Gumbel mean is Euler's constant


def test_same_seed_same_tokens_alone_and_in_any_batch(llama, persrm):
    engine = Engine(llama, persrm, block_size=4)
    prompt = [[5, 17, 42, 9, 100, 23]]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=0, weight=1.0, seed=99, ignore_eos=True)
    alone = engine.generate(prompt_token_ids=prompt, params=params)[0].token_ids
    others = [[7, 8, 9], [200, 3, 44, 51, 12, 9, 10, 11], [60] * 20]
    mixed = engine.generate(prompt_token_ids=others[:2] + prompt + others[2:],
                            params=[SamplingParams(max_tokens=m, temperature=0.9, seed=s) for m, s in [(5, 1), (30, 2)]]
                            + [params, SamplingParams(max_tokens=9, temperature=2.0)])
    assert mixed[2].token_ids == alone
    other_seed = engine.generate(prompt_token_ids=prompt, params=SamplingParams(
        max_tokens=16, temperature=1.0, top_k=0, weight=1.0, seed=100, ignore_eos=True))[0].token_ids
    assert other_seed != alone
    assert math.isfinite(sum(engine.generate(prompt_token_ids=prompt, params=params)[0].logprobs))


def test_sampled_output_survives_preemption(llama, persrm, tokenizer):
    from tests.helpers import random_batch
    base, reward, params = random_batch(len(tokenizer), n=16, seed=5)
    for i, p in enumerate(params):
        p.temperature, p.seed = 0.8, i
    roomy = Engine(llama, persrm, block_size=4)
    tight = Engine(llama, persrm, block_size=4, num_kv_blocks=40)
    a = roomy.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    b = tight.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    assert sum(o.metrics.num_preemptions for o in b) > 0
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
