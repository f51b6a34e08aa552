"""Streaming: incremental detokenization, stop strings, Engine.stream and the AsyncEngine."""
import asyncio

import pytest

from padengine import Engine, SamplingParams
from padengine.engine.sequence import Request, Sequence
from padengine.serving.async_engine import AsyncEngine
from padengine.engine.detokenizer import IncrementalDetokenizer

TEXT = "Héllo wörld, ünïcödé 🙂🙂 text — with a stop marker ### and more after it."


def feed(tokenizer, ids, stop=None):
    """Push ids one at a time through a detokenizer, as engine steps would; return the outputs."""
    req = Request(0, SamplingParams(max_tokens=len(ids)), 0, set(), [Sequence([1], 0)], [])
    detok, outs = IncrementalDetokenizer(tokenizer, stop), []
    for t in ids:
        req.reserve(0)
        req.fill(t, 0.0)
        outs.append(detok.update(req))
        if outs[-1].finished:
            break
    return outs


def test_incremental_text_equals_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT)
    outs = feed(tokenizer, ids)
    assert "".join(o.text for o in outs) == tokenizer.decode(ids) == TEXT
    assert all("\ufffd" not in o.text for o in outs)          # split UTF-8 sequences are held back
    assert [t for o in outs for t in o.token_ids] == ids and outs[-1].finish_reason == "length"


def test_stop_string_cuts_text(tokenizer):
    outs = feed(tokenizer, tokenizer.encode(TEXT), stop=["###", "never"])
    assert "".join(o.text for o in outs) == TEXT[:TEXT.index("###")]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"


@pytest.fixture(scope="module")
def engine(llama, persrm):
    return Engine(llama, persrm, block_size=4)


PROMPTS = ["write a short poem about the sea", "explain how a computer works", "the quick brown fox"]


def test_stream_equals_generate(engine):
    params = SamplingParams(max_tokens=12, weight=1.5, temperature=0.7, seed=3)
    full = engine.generate(PROMPTS, params, preferences="be concise")
    text, ids = [""] * 3, [[] for _ in range(3)]
    for out in engine.stream(PROMPTS, params, preferences="be concise"):
        text[out.index] += out.text
        ids[out.index] += out.token_ids
    assert text == [o.text for o in full] and ids == [o.token_ids for o in full]


def test_async_engine_many_callers_and_cancel(engine):
    params = [SamplingParams(max_tokens=6 + i, weight=(0.0, 1.0, 2.0)[i % 3], temperature=0.5 * (i % 2),
                             seed=i, top_k=(5, 10, 0)[i % 3]) for i in range(12)]
    expected = engine.generate([PROMPTS[i % 3] for i in range(12)], params, preferences="be concise")
    aengine = AsyncEngine(engine)

    async def collect(i):
        outs = [o async for o in aengine.generate(PROMPTS[i % 3], params[i], preference="be concise")]
        return [t for o in outs for t in o.token_ids], outs[-1].metrics

    async def cancelled():
        stream = aengine.generate(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        await anext(stream)
        await stream.aclose()                   # the caller goes away mid-request

    async def main():
        results = await asyncio.gather(*[collect(i) for i in range(12)], cancelled())
        for _ in range(100):                    # the abort is applied before the next step
            if not engine.scheduler.has_work():
                break
            await asyncio.sleep(0.05)
        return results

    try:
        results = asyncio.run(main())
    finally:
        aengine.shutdown()
    assert [ids for ids, _ in results[:12]] == [o.token_ids for o in expected]
    assert all(m.time_to_first_token > 0 and m.queue_time >= 0 for _, m in results[:12])
    assert not engine.scheduler.has_work()
    assert all(p.num_used == 0 for p in engine.scheduler.pools)
    assert aengine.stats.finished["abort"] == 1


def test_leaving_a_stream_early_frees_its_requests(engine):
    stream = engine.stream(PROMPTS, SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not engine.scheduler.has_work()
    assert all(p.num_used == 0 for p in engine.scheduler.pools)
