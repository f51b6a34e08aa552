"""Chunked prefill: with a small max_num_batched_tokens, prompts are prefilled over several steps (each
stream up to its last token, the last tokens of all streams together), while running requests keep
decoding. Float32 greedy output must still equal the transformers reference token for token."""
import random

import pytest

from padengine import Engine, SamplingParams
from tests.helpers import fail_launch, random_batch, reference


def spy_chunks(engine):
    """Record, per step, how many prefilling requests only advanced a chunk (no token sampled)."""
    partial = []
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        partial.append(sum(not r.samples_this_step for r in batch.prefill))
        return batch

    engine.scheduler.schedule = spy
    return partial


def generate(engine, base, reward, params):
    return [o.token_ids for o in engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward,
                                                 params=params)]


@pytest.mark.parametrize("budget", [5, 16])
def test_chunked_prefill_matches_reference(llama, persrm, tokenizer, budget):
    """Shared prefixes (blocks published chunk by chunk), preemption, and decoding alongside chunks."""
    base, reward, params = random_batch(len(tokenizer), n=16, seed=13, shared_prefix=10)
    engine = Engine(llama, persrm, block_size=4, num_kv_blocks=60, max_num_batched_tokens=budget)
    partial = spy_chunks(engine)
    assert generate(engine, base, reward, params) == reference(llama, persrm, base, reward, params)
    assert sum(partial) > 10
    assert all(p.num_used == 0 for p in engine.scheduler.pools)


def test_chunked_prefill_one_model_several_preferences(qwen2, tokenizer):
    """Base and reward streams in one pool (a reward prompt equal to the base prompt shares its blocks
    as they are published), requests with one to three preferences, CUDA-graph decode steps between."""
    base, _, params = random_batch(len(tokenizer), n=10, seed=14)
    rng = random.Random(14)
    multi = [[(b, 1.0)] + [([rng.randrange(4, 300) for _ in range(6)] + b, (0.5, -0.5)[j]) for j in range(i % 3)]
             for i, b in enumerate(base)]
    engine = Engine(qwen2, qwen2, block_size=4, max_num_batched_tokens=6, cuda_graphs=True)
    partial = spy_chunks(engine)
    assert generate(engine, base, multi, params) == reference(qwen2, qwen2, base, multi, params)
    assert sum(partial) > 5


def test_failed_chunk_leaves_no_unwritten_blocks_published(llama, persrm, tokenizer, monkeypatch):
    base, reward, params = random_batch(len(tokenizer), n=3, seed=15, shared_prefix=24)
    engine = Engine(llama, persrm, block_size=4, max_num_batched_tokens=8)
    launch = fail_launch(engine, monkeypatch, 3)
    with pytest.raises(RuntimeError):
        generate(engine, base, reward, params)
    monkeypatch.setattr(engine.runner, "launch", launch)
    assert generate(engine, base, reward, params) == reference(llama, persrm, base, reward, params)
    assert all(p.num_used == 0 for p in engine.scheduler.pools)


def test_reward_prompt_equal_to_base_prompt_is_prefilled_once(qwen2, tokenizer):
    """One model, reward prompt = base prompt: as the base stream's chunks publish blocks, the reward
    stream swaps them in (`BlockManager.rematch`) instead of computing the prompt a second time."""
    prompt = [random.Random(16).randrange(4, 300) for _ in range(60)]
    engine = Engine(qwen2, qwen2, block_size=4, max_num_batched_tokens=8)
    computed, schedule = [], engine.scheduler.schedule

    def spy():
        batch = schedule()
        computed.append(sum(s.step_end - s.num_computed_tokens for r in batch.prefill for s in r.streams))
        return batch

    engine.scheduler.schedule = spy
    params = [SamplingParams(max_tokens=6, weight=1.0, ignore_eos=True)]
    assert generate(engine, [prompt], [prompt], params) == reference(qwen2, qwen2, [prompt], [prompt], params)
    assert sum(computed) <= len(prompt) + 4          # the reward stream computes its last block only
