"""Sampling options beyond the PAD rule: top-p / min-p filters, penalties, log-probabilities
(alternatives and the base model's own) and n choices per prompt, each against a reference."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from benchmarks.baselines.hf_pad import HFPad
from padengine import Engine, InvalidInput, SamplingParams
from padengine.layers.sampler import apply_penalties, filter_scores, pad_sample, pad_scores
from tests.helpers import random_batch


def rows(n, **values):
    """Per-row sampler arguments: top_k, weight, temperature, seed, position [n]."""
    full = lambda v, dt: torch.full((n,), v, dtype=dt)
    return (full(values.get("top_k", 10), torch.long), full(values.get("weight", 1.0), torch.float32),
            full(values.get("temperature", 1.0), torch.float32), full(values.get("seed", 7), torch.long),
            torch.arange(n))


def kept_by_definition(probs: list[float], top_p: float, min_p: float) -> set[int]:
    """The candidates a filter keeps, written out: the smallest most-likely-first prefix whose mass
    reaches top_p (ties at its last probability kept), and those at least min_p times the best."""
    mass, cut = 0.0, None
    for p in sorted(probs, reverse=True):
        if mass >= top_p:
            break
        cut, mass = p, mass + p
    kept = {i for i in range(len(probs)) if top_p >= 1 or probs[i] >= cut}
    return {i for i in kept if probs[i] >= min_p * max(probs) and probs[i] > 0}


@pytest.mark.parametrize("top_p,min_p", [(0.5, 0.0), (0.9, 0.0), (1.0, 0.2), (0.7, 0.05), (0.01, 0.0)])
def test_filter_keeps_what_the_definition_keeps(top_p, min_p):
    torch.manual_seed(0)
    scaled = torch.randn(40, 12) * 2
    scaled[:, -3:] = float("-inf")                    # past the row's own k
    out = filter_scores(scaled, torch.full((40,), top_p), torch.full((40,), min_p))
    for row, filtered in zip(scaled, out):
        probs = torch.softmax(row.double(), 0).tolist()
        assert {i for i, v in enumerate(filtered.tolist()) if v > float("-inf")} == \
            kept_by_definition(probs, top_p, min_p)


def test_no_filter_values_leave_results_bit_identical():
    torch.manual_seed(1)
    zb, zr = torch.randn(32, 60) * 3, torch.randn(32, 64) * 3
    args = rows(32, top_k=0, temperature=0.9)
    plain = pad_sample(zb, zr, *args)
    neutral = pad_sample(zb, zr, *args, top_p=torch.ones(32), min_p=torch.zeros(32))
    assert torch.equal(plain.tokens, neutral.tokens) and torch.equal(plain.logprobs, neutral.logprobs)


@pytest.mark.parametrize("top_k,top_p,min_p,temperature", [(0, 0.8, 0.0, 1.0), (12, 1.0, 0.1, 0.7),
                                                           (0, 0.6, 0.05, 1.3)])
def test_filtered_draws_follow_the_renormalized_distribution(top_k, top_p, min_p, temperature):
    """Chi-square goodness of fit over 20000 draws (one per position) from one fixed row, and no draw
    outside the kept set."""
    torch.manual_seed(2)
    vocab, n = 30, 20000
    zb, zr = torch.randn(vocab) * 1.5, torch.randn(vocab) * 1.5
    args = rows(n, top_k=top_k, temperature=temperature, seed=99)
    tokens = pad_sample(zb.expand(n, vocab), zr.expand(n, vocab), *args, top_p=torch.full((n,), top_p),
                        min_p=torch.full((n,), min_p)).tokens
    cand, score = pad_scores(zb[None], zr[None], args[0][:1], args[1][:1])
    probs = torch.softmax(score[0].double() / temperature, 0).tolist()
    kept = sorted(kept_by_definition(probs, top_p, min_p))
    expected = torch.tensor([probs[i] for i in kept], dtype=torch.float64)
    expected = expected / expected.sum() * n
    counts = torch.tensor([(tokens == cand[0, i]).sum().item() for i in kept], dtype=torch.float64)
    assert counts.sum() == n, "drew a filtered-out token"
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    p_value = float(torch.special.gammaincc(torch.tensor((len(kept) - 1) / 2), torch.tensor(chi2 / 2)))
    assert p_value > 1e-3, f"chi2={chi2:.1f} p={p_value:.2e}"


def test_logprobs_are_the_log_softmax_of_the_filtered_scores():
    torch.manual_seed(3)
    zb, zr = torch.randn(16, 50) * 3, torch.randn(16, 50) * 3
    top_k, weight, temperature, seed, position = rows(16, top_k=20, temperature=0.8)
    temperature[::2] = 0                               # greedy rows report at T = 1
    top_p = torch.linspace(0.3, 1.0, 16)
    out = pad_sample(zb, zr, top_k, weight, temperature, seed, position, top_p=top_p, num_top=5)
    cand, score = pad_scores(zb, zr, top_k, weight)
    scaled = score / torch.where(temperature > 0, temperature, 1.0)[:, None]
    logp = torch.log_softmax(filter_scores(scaled, top_p, None), -1)
    for i in range(16):
        by_token = dict(zip(cand[i].tolist(), logp[i].tolist()))
        assert out.logprobs[i].item() == pytest.approx(by_token[int(out.tokens[i])], abs=1e-6)
        best = sorted(((t, v) for t, v in by_token.items() if v > float("-inf")), key=lambda kv: -kv[1])[:5]
        finite = out.top_logprobs[i] > float("-inf")        # fewer than 5 may survive the filter
        assert out.top_ids[i][finite].tolist() == [t for t, _ in best]
        assert out.top_logprobs[i][finite].tolist() == pytest.approx([v for _, v in best], abs=1e-6)
        if temperature[i] == 0:
            assert int(out.tokens[i]) == best[0][0]
        assert math.fsum(math.exp(v) for v in by_token.values()) == pytest.approx(1.0, abs=1e-5)


class OpenAIPenalties(LogitsProcessor):
    """Presence and frequency penalties over the generated tokens (after `prompt_len`), as OpenAI
    defines them, for transformers' generation loop."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def processors(prompt_len: int, p: SamplingParams) -> LogitsProcessorList:
    out = LogitsProcessorList([OpenAIPenalties(prompt_len, p.presence_penalty, p.frequency_penalty)])
    if p.repetition_penalty != 1.0:
        out.insert(0, RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    return out


def test_penalties_equal_transformers_processors():
    torch.manual_seed(4)
    logits, prompt, generated = torch.randn(3, 40) * 3, torch.randint(0, 40, (3, 6)), torch.randint(0, 40, (3, 9))
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    counts = torch.zeros(3, 40).scatter_add_(1, generated, torch.ones(3, 9))
    seen = (counts > 0) | torch.zeros(3, 40, dtype=torch.bool).scatter_(1, prompt, True)
    full = lambda v: torch.full((3,), v)
    got = apply_penalties(logits, counts, seen, full(1.3), full(0.5), full(0.25))
    expected = processors(6, p)(torch.cat([prompt, generated], 1), logits.clone())
    torch.testing.assert_close(got, expected)


def penalized_batch(vocab):
    base, reward, _ = random_batch(vocab, n=9, seed=5)
    settings = [(1.0, 0.0, 0.0), (1.5, 0.0, 0.0), (0.8, 0.0, 0.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.7),
                (1.2, 0.5, 0.5), (1.0, -1.0, 0.0), (2.0, 2.0, 2.0), (1.0, 0.0, -0.5)]
    params = [SamplingParams(max_tokens=16, top_k=(1, 10, 0)[i % 3], weight=(0.5, 1.5, 0.0)[i % 3],
                             repetition_penalty=r, presence_penalty=pr, frequency_penalty=f, ignore_eos=True)
              for i, (r, pr, f) in enumerate(settings)]
    return base, reward, params


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_penalized_decoding_matches_reference(llama, persrm, tokenizer, cuda_graphs):
    """Greedy PAD with penalties on both models' logits equals transformers' processors in the reference
    loop, token for token (mixed with unpenalized rows in one batch)."""
    base, reward, params = penalized_batch(len(tokenizer))
    engine = Engine(llama, persrm, block_size=4, cuda_graphs=cuda_graphs)
    got = [o.token_ids for o in engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward,
                                                params=params)]
    ref = HFPad.load(llama, persrm)
    expected = [ref.generate(b, [(r, p.weight)], p.max_tokens, p.top_k, set(), processors(len(b), p))
                for b, r, p in zip(base, reward, params)]
    assert got == expected
    plain = [ref.generate(b, [(r, p.weight)], p.max_tokens, p.top_k, set()) for b, r, p in zip(base, reward, params)]
    assert sum(g != e for g, e in zip(got, plain)) >= 5, "the penalties changed too few outputs to test them"


def test_base_logprobs_are_the_base_models_own(llama, persrm, tokenizer):
    base, reward, _ = random_batch(len(tokenizer), n=3, seed=6)
    params = SamplingParams(max_tokens=8, weight=1.5, base_logprobs=True, top_logprobs=3, ignore_eos=True)
    outs = Engine(llama, persrm, block_size=4).generate(prompt_token_ids=base, reward_prompt_token_ids=reward,
                                                        params=params)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    for b, out in zip(base, outs):
        with torch.no_grad():
            logits = model(torch.tensor([b + out.token_ids])).logits[0, len(b) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        assert out.base_logprobs == pytest.approx(expected.tolist(), abs=1e-4)
        for lp, top, token in zip(out.logprobs, out.top_logprobs, out.token_ids):
            assert top[0] == (token, pytest.approx(lp, abs=1e-6))      # greedy: the choice is the best
            assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_graph_steps_equal_eager_with_filters_and_logprobs(llama, persrm, tokenizer):
    base, reward, _ = random_batch(len(tokenizer), n=6, seed=7)
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=(5, 30, 0)[i % 3], seed=i, weight=1.0,
                             top_p=(0.6, 1.0, 0.9)[i % 3], min_p=(0.0, 0.1)[i % 2], top_logprobs=i % 4,
                             base_logprobs=bool(i % 2)) for i in range(6)]
    outs = [Engine(llama, persrm, block_size=4, cuda_graphs=g).generate(
        prompt_token_ids=base, reward_prompt_token_ids=reward, params=params) for g in (True, False)]
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert [[t for t, _ in top] for top in a.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]
        assert a.base_logprobs == pytest.approx(b.base_logprobs, abs=1e-5)


def test_n_choices_share_one_prefill_and_reproduce(llama, persrm, tokenizer):
    prompt = list(range(4, 40))
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=0, n=3, seed=11, ignore_eos=True)
    engine = Engine(llama, persrm, block_size=4)
    first = engine.generate(prompt_token_ids=[prompt, prompt[:20]], params=params)
    assert [(o.choice, o.prompt_token_ids) for o in first] == [(0, prompt), (1, prompt), (2, prompt),
                                                               (0, prompt[:20]), (1, prompt[:20]), (2, prompt[:20])]
    assert len({tuple(o.token_ids) for o in first[:3]}) == 3, "choices drew the same tokens"
    # choices after the first read the prompt's blocks the first one computes in the same step
    assert first[0].metrics.num_cached_tokens == 0
    assert all(o.metrics.num_cached_tokens == 32 for o in first[1:3])
    again = Engine(llama, persrm, block_size=4).generate(prompt_token_ids=[prompt, prompt[:20]], params=params)
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    single = engine.generate(prompt_token_ids=[prompt], params=SamplingParams(
        max_tokens=12, temperature=1.0, top_k=0, seed=11, ignore_eos=True))
    assert single[0].token_ids == first[0].token_ids


def test_n_choices_are_preempted_together_and_resume_the_same(llama, persrm, tokenizer):
    base, reward, _ = random_batch(len(tokenizer), n=6, seed=8)
    params = SamplingParams(max_tokens=14, temperature=0.8, n=3, seed=5, weight=1.0, ignore_eos=True)
    roomy = Engine(llama, persrm, block_size=4)
    tight = Engine(llama, persrm, block_size=4, num_kv_blocks=60)
    a = roomy.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    b = tight.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    assert sum(o.metrics.num_preemptions for o in b) > 0
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for group in (b[i:i + 3] for i in range(0, 18, 3)):          # the group's running choices go together
        assert len({o.metrics.num_preemptions for o in group if o.finish_reason == "length"}) == 1
    assert all(p.num_used == 0 for p in tight.scheduler.pools)


def test_n_choices_must_fit_together(llama, persrm):
    engine = Engine(llama, persrm, block_size=4, max_num_seqs=4, num_kv_blocks=200)
    with pytest.raises(InvalidInput, match="params.n"):
        engine.generate(prompt_token_ids=[[5, 6, 7]], params=SamplingParams(n=5))
    with pytest.raises(InvalidInput, match="num_kv_blocks"):
        engine.generate(prompt_token_ids=[[5] * 100], params=SamplingParams(n=4, max_tokens=104))


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 2.0),
                                         ("repetition_penalty", 0.0), ("presence_penalty", 2.5),
                                         ("frequency_penalty", -3.0), ("top_logprobs", 21), ("n", 0),
                                         ("weight", 1e308), ("temperature", 1e-30), ("temperature", 1e9)])
def test_out_of_range_values_are_refused(llama, field, value):
    engine = Engine(llama, block_size=4)
    with pytest.raises(InvalidInput, match=f"params.{field}"):
        engine.generate(prompt_token_ids=[[5, 6]], params=SamplingParams(**{field: value}))
