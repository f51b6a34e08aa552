"""Asynchronous scheduling (step t+1 scheduled and launched before step t's tokens are read) gives the
tokens of the synchronous loop and of the transformers reference, across the scheduler's paths."""
import asyncio
import random

import pytest

from padengine import Engine, SamplingParams
from padengine.serving.async_engine import AsyncEngine
from tests.helpers import add_stop_tokens, fail_launch, interleave, random_batch, reference


def generate(engine, base, reward, params):
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("setting", [dict(), dict(num_kv_blocks=40), dict(max_num_batched_tokens=8),
                                     dict(cuda_graphs=True), dict(max_num_seqs=3)])
def test_greedy_async_matches_reference(llama, persrm, tokenizer, setting):
    """Stop tokens, EOS, max_tokens; with preemption, chunked prefill, graph steps, joining requests."""
    base, reward, params = random_batch(len(tokenizer), n=14, seed=21, shared_prefix=12)
    params[0].max_tokens = params[5].max_tokens = 1
    expected = add_stop_tokens(params, reference(llama, persrm, base, reward, params))
    engine = Engine(llama, persrm, block_size=4, async_scheduling=True, **setting)
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    assert [o.token_ids for o in outs] == expected
    if "num_kv_blocks" in setting:
        assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert engine.in_flight is not None or not engine.scheduler.has_work()
    engine.step()                                    # collects the last launched step, if any
    assert all(p.num_used == 0 for p in engine.scheduler.pools)


def test_several_preferences_with_graph_steps(qwen2, tokenizer):
    base, _, params = random_batch(len(tokenizer), n=6, seed=22)
    rng = random.Random(3)
    multi = [[(b[:rng.randrange(1, len(b) + 1)] + [7, 8], 0.7), (b, -0.4)] for b in base]
    engine = Engine(qwen2, qwen2, block_size=4, cuda_graphs=True, async_scheduling=True)
    assert generate(engine, base, multi, params) == reference(qwen2, qwen2, base, multi, params)


def test_sampling_options_equal_in_both_modes(llama, persrm, tokenizer):
    """Seeded draws with top-p, min-p, penalties (their counts read the pending token), alternatives,
    base log-probabilities and n choices, preempted too."""
    base, reward, _ = random_batch(len(tokenizer), n=5, seed=23)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_k=(0, 8, 30)[i % 3], seed=i, weight=1.0,
                             top_p=0.85, min_p=0.02, repetition_penalty=(1.0, 1.3)[i % 2],
                             frequency_penalty=0.4 * (i % 3), top_logprobs=3, base_logprobs=True, n=2,
                             ignore_eos=True) for i in range(5)]
    outs = [Engine(llama, persrm, block_size=4, num_kv_blocks=48, async_scheduling=mode).generate(
        prompt_token_ids=base, reward_prompt_token_ids=reward, params=params) for mode in (False, True)]
    assert sum(o.metrics.num_preemptions for o in outs[1]) > 0
    for a, b in zip(*outs):
        assert (a.token_ids, a.choice) == (b.token_ids, b.choice)
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert a.base_logprobs == pytest.approx(b.base_logprobs, abs=1e-5)
        assert [[t for t, _ in top] for top in a.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]


def test_next_step_is_laid_out_before_the_previous_tokens_are_read(llama, persrm, tokenizer):
    base, reward, params = random_batch(len(tokenizer), n=4, seed=24)
    events = []
    for mode in (True, False):
        engine = Engine(llama, persrm, block_size=4, async_scheduling=mode)
        layout, collect = engine.runner.layout, engine.runner.collect
        engine.runner.layout = lambda *a, **k: (events.append("layout"), layout(*a, **k))[1]
        engine.runner.collect = lambda p: (events.append("collect"), collect(p))[1]
        generate(engine, base, reward, params)
        laid_out = read = 0
        for event in events:          # when step k's tokens are read, how many steps were laid out
            laid_out += event == "layout"
            if event == "collect":
                read += 1
                total = events.count("layout")
                # async: step k + 1 was laid out first (but at the end, when nothing is left to schedule)
                assert laid_out == read + 1 or (laid_out == total and read > total - 2) if mode else laid_out == read
        assert read > 5
        events[:] = []


def test_streams_with_stop_strings_and_aborts_equal_in_both_modes(llama, persrm, tokenizer):
    base, reward, params = random_batch(len(tokenizer), n=6, seed=25)
    texts = {}
    for mode in (False, True):
        engine = Engine(llama, persrm, block_size=4, async_scheduling=mode)
        probe = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
        stop = [o.text[len(o.text) // 2:][:2] for o in probe if len(o.text) > 4][:2]
        out = {}
        stream = engine.stream(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params, stop=stop)
        for i, chunk in enumerate(stream):
            out[chunk.index] = out.get(chunk.index, "") + chunk.text
            if i == 12:
                break                                 # leaving the stream aborts what is left
        stream.close()
        engine.step()
        assert all(p.num_used == 0 for p in engine.scheduler.pools)
        texts[mode] = (stop, out, [o.token_ids for o in engine.generate(
            prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)])
    assert texts[False] == texts[True]


def test_failed_launch_recovers(llama, persrm, tokenizer, monkeypatch):
    base, reward, params = random_batch(len(tokenizer), n=4, seed=26, shared_prefix=24)
    engine = Engine(llama, persrm, block_size=4, max_num_batched_tokens=8, async_scheduling=True)
    launch = fail_launch(engine, monkeypatch, 4)
    with pytest.raises(RuntimeError):
        generate(engine, base, reward, params)
    monkeypatch.setattr(engine.runner, "launch", launch)
    assert generate(engine, base, reward, params) == reference(llama, persrm, base, reward, params)


def test_async_engine_streams_the_same_tokens(llama, persrm, tokenizer):
    base, reward, params = random_batch(len(tokenizer), n=4, seed=27)

    async def run(mode):
        server = AsyncEngine(Engine(llama, persrm, block_size=4, async_scheduling=mode))
        try:
            async def one(b, r, p):
                return [t for out in [o async for o in server.generate(params=p, prompt_token_ids=b,
                                                                        reward_prompt_token_ids=r)]
                        for t in out.token_ids]
            return await asyncio.gather(*(one(b, r, p) for b, r, p in zip(base, reward, params)))
        finally:
            server.shutdown()

    assert asyncio.run(run(True)) == asyncio.run(run(False)) == reference(llama, persrm, base, reward, params)


@pytest.mark.parametrize("seed", range(40))
def test_random_interleavings_equal_in_both_modes(llama, persrm, tokenizer, seed):
    """Requests joining mid-run, aborted at a token count, greedy or seeded, one or two preferences,
    penalties, alternatives, n choices, under preemption, chunked prefill, few sequences or graph steps."""
    rng = random.Random(seed)
    n = rng.randrange(3, 9)
    base, reward, _ = random_batch(len(tokenizer), n=n, seed=100 + seed, shared_prefix=rng.choice([0, 8]))
    plan = []
    for i in range(n):
        sampled = rng.random() < 0.4
        params = SamplingParams(max_tokens=rng.randrange(1, 14), temperature=0.8 if sampled else 0.0,
                                seed=seed * 10 + i if sampled else None, weight=rng.choice([0.0, 1.0, 2.0]),
                                top_k=rng.choice([0, 5, 20]), ignore_eos=rng.random() < 0.5,
                                repetition_penalty=1.2 if rng.random() < 0.2 else 1.0,
                                top_logprobs=rng.choice([0, 0, 2]), n=rng.choice([1, 1, 2]))
        rewards = [(reward[i], 1.0), (base[i][:3] + [5], -0.5)] if rng.random() < 0.3 else reward[i]
        joins = None if i < 2 or rng.random() < 0.5 else rng.randrange(0, 6)
        plan.append((joins, base[i], rewards, params, rng.randrange(1, 8) if rng.random() < 0.25 else None))
    setting = rng.choice([dict(), dict(num_kv_blocks=rng.randrange(36, 56)), dict(max_num_batched_tokens=8),
                          dict(max_num_seqs=2), dict(cuda_graphs=True)])
    outs = [{i: (req.output_ids, req.finish_reason) for i, req in interleave(
                Engine(llama, persrm, block_size=4, async_scheduling=mode, **setting), plan).items()}
            for mode in (False, True)]
    assert outs[0] == outs[1]
    for i, (ids, reason) in outs[1].items():
        assert reason != "abort" or len(ids) == plan[i][4]
