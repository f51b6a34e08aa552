"""An engine, once closed or dropped, leaves nothing alive: models, value head, KV pools, graphs and the
buffers the asynchronous loop reads (on CUDA, tests/test_gpu_engine.py checks the device memory too)."""
import gc
import weakref

import pytest

from padengine import Engine
from padengine.errors import EngineClosed
from tests.helpers import random_batch


def holdings(engine) -> list[weakref.ref]:
    r = engine.runner
    held = [engine, r, engine.scheduler, r.value_head, r.sampled_tokens, *filter(None, r.models),
            *engine.scheduler.pools,
            *[g.graph for g in r.graphs.graphs.values()]]
    held += [m.model.layers[0].self_attn.k_cache._base for m in r.models]       # the KV pool tensors
    return [weakref.ref(x) for x in held]


def test_close_or_del_releases_everything_twice_in_one_process(llama, persrm, tokenizer):
    """Closed by leaving `with` (nothing stays, even while the engine object itself is still referenced),
    then refusing work; then an engine dropped without close, which the collector frees."""
    base, reward, params = random_batch(len(tokenizer), n=4, seed=50)
    kw = dict(block_size=4, cuda_graphs=True, async_scheduling=True)
    outs = []
    with Engine(llama, persrm, **kw) as engine:
        outs.append(engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params))
        refs = holdings(engine)
        assert engine.runner.graphs.graphs and all(ref() is not None for ref in refs)
    assert [ref() is None for ref in refs[1:]] == [True] * (len(refs) - 1)
    with pytest.raises(EngineClosed, match="closed"):
        engine.generate(prompt_token_ids=base, params=params)
    engine.close()                                  # a second close is harmless
    del engine
    gc.collect()
    assert refs[0]() is None
    engine = Engine(llama, persrm, **kw)
    outs.append(engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params))
    refs = holdings(engine)
    del engine
    gc.collect()
    assert [ref() is None for ref in refs] == [True] * len(refs)
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
