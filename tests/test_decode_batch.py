"""The persistent batch lays out every decode step exactly as the general path does from the streams,
across joins, leaves, preemption, chunked prefill, aborts, several preferences, graph padding and both
loops; and a step that fails after it advanced leaves nothing stale behind."""
import random

import numpy as np
import pytest

from padengine import Engine, SamplingParams
from padengine.executor.layout import layout_step
from tests.helpers import random_batch, reference


def checked(engine):
    """Wrap the persistent batch so that each step it lays out is compared, field by field, with the
    general path's layout of the same batch; returns the list of compared steps' batch sizes."""
    runner, batch, seen = engine.runner, engine.runner.decode_batch, []
    persistent = batch.layout

    def layout(decode, pad_to=None, width=None):
        step = persistent(decode, pad_to, width)
        if step is not None:
            widths = {shape[1] for *_, shape in step.fields.table if shape}     # one, or none
            want = layout_step(decode, [], runner.placement, runner.cfg.block_size, runner.sink, runner.vocab_size,
                               pad_to, width or max(widths), feed=runner.sampled_tokens is not None)
            # the same columns (group, model, name, dtype, size, shape) with the same values
            shapes = lambda fields: sorted((f[:4] + f[5:] for f in fields.table), key=repr)
            assert shapes(step.fields) == shapes(want.fields)
            got, ref = step.fields.arrays(), want.fields.arrays()
            for key in got:
                for name, values in vars(got[key]).items():
                    assert (values is None) == (getattr(ref[key], name) is None), (key, name)
                    assert values is None or np.array_equal(values, getattr(ref[key], name)), (key, name)
            assert (step.num_rows, step.num_rewards, step.max_k, step.num_top, step.base_logprobs) == \
                (want.num_rows, want.num_rewards, want.max_k, want.num_top, want.base_logprobs)
            assert [m and m.lens for m in step.models] == [m and m.lens for m in want.models]
            seen.append(len(decode))
        return step
    batch.layout = layout
    return seen


@pytest.mark.parametrize("mode", [False, True])
@pytest.mark.parametrize("setting", [dict(), dict(num_kv_blocks=40), dict(max_num_batched_tokens=8),
                                     dict(cuda_graphs=True), dict(max_num_seqs=3)])
def test_decode_steps_lay_out_as_the_general_path(llama, persrm, tokenizer, setting, mode):
    base, reward, params = random_batch(len(tokenizer), n=14, seed=31, shared_prefix=12)
    for i, p in enumerate(params):
        p.top_p, p.temperature, p.seed = (0.9, 0.8, i) if i % 4 == 3 else (1.0, p.temperature, p.seed)
    params[2].top_logprobs, params[4].base_logprobs = 3, True
    engine = Engine(llama, persrm, block_size=4, async_scheduling=mode, **setting)
    seen = checked(engine)
    engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    assert len(seen) >= 5


@pytest.mark.parametrize("model", ["shared", "unguided", "several"])
def test_placements_and_several_preferences(llama, persrm, qwen2, tokenizer, model):
    base, reward, params = random_batch(len(tokenizer), n=6, seed=32)
    rng = random.Random(4)
    if model == "several":
        reward = [[(b[:rng.randrange(1, len(b) + 1)] + [7, 8], 0.7), (b, -0.4)] for b in base]
    engine = Engine(qwen2 if model == "shared" else llama, None if model == "unguided" else
                    qwen2 if model == "shared" else persrm, block_size=4, cuda_graphs=model != "unguided")
    seen = checked(engine)
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=None if model == "unguided" else reward,
                           params=params)
    assert seen
    if model == "several":
        assert [o.token_ids for o in outs] == reference(llama, persrm, base, reward, params)


def test_aborts_and_penalties_mid_stream(llama, persrm, tokenizer):
    """Requests that leave early and penalized ones (the general path, which resets the batch)."""
    base, reward, params = random_batch(len(tokenizer), n=8, seed=33)
    params[3] = SamplingParams(max_tokens=12, repetition_penalty=1.3, weight=0.5)
    engine = Engine(llama, persrm, block_size=4, async_scheduling=True)
    seen = checked(engine)
    reqs = engine.add_requests(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    for step in range(40):
        engine.step()
        if step == 6:
            engine.abort(reqs[1])
            engine.abort(reqs[5])
    assert seen and all(r.is_finished for r in reqs)


def test_failed_step_after_the_layout_resets(llama, persrm, tokenizer, monkeypatch):
    base, reward, params = random_batch(len(tokenizer), n=4, seed=34)
    for p in params:
        p.max_tokens = 16
    expected = reference(llama, persrm, base, reward, params)
    engine = Engine(llama, persrm, block_size=4)
    compute, calls = engine.runner.compute, []

    def failing(inputs):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("device lost")
        return compute(inputs)
    monkeypatch.setattr(engine.runner, "compute", failing)
    with pytest.raises(RuntimeError):
        engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    seen = checked(engine)
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    assert [o.token_ids for o in outs] == expected and seen
