"""Decode steps through the CUDA-graph path (`cuda_graphs=True`): padded to a bucket, block tables at full
width, static input buffers refilled each step, no host reads inside the step. On the CPU the graphs are
emulated as CUDA runs them (a bucket's first step warmed up, then replayed over the same static buffers;
replays leave their results in static outputs), so everything but the capture itself is checked against the
transformers reference; tests/test_gpu_engine.py checks the captured graphs on CUDA."""
import random

import pytest

from padengine import Engine, SamplingParams
from tests.helpers import interleave, joining_plan, random_batch, reference


def spy_graphs(engine):
    """Count the decode steps the graphs ran and the ones they sent back to the eager path."""
    counts = {"graph": 0, "eager": 0}
    bucket = engine.runner.graphs.bucket

    def counted(decode):
        shape = bucket(decode)
        counts["graph" if shape is not None else "eager"] += 1
        return shape

    engine.runner.graphs.bucket = counted
    return counts


def generate(engine, base, reward, params):
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    return [o.token_ids for o in outs]


def test_graph_steps_match_reference_under_preemption(llama, persrm, tokenizer, monkeypatch):
    """Rows of top-k 1, 10 and the whole vocabulary (two sampler widths), weight 0 rows, batches that
    shrink across buckets as requests finish, contexts that grow across table widths, and preemption."""
    monkeypatch.setattr("padengine.executor.cuda_graphs.MIN_SPAN", 16)
    base, reward, params = random_batch(len(tokenizer), n=16, seed=1)
    engine = Engine(llama, persrm, block_size=4, num_kv_blocks=40, cuda_graphs=True)
    counts = spy_graphs(engine)
    assert generate(engine, base, reward, params) == reference(llama, persrm, base, reward, params)
    growing = [SamplingParams(max_tokens=30, ignore_eos=True, weight=1.0)]
    assert generate(engine, [base[0][:10]], None, growing) == reference(llama, persrm, [base[0][:10]], [base[0][:10]],
                                                                        growing)
    assert counts["graph"] > 40
    keys = engine.runner.graphs.graphs
    assert {k[2] for k in keys} == {16, len(tokenizer)}         # top-k width: 10 rounded up, or whole vocab
    assert {k[3] for k in keys} >= {4, 8, 16}                   # blocks of 4: contexts up to 16, 32, 64
    assert all(p.num_used == 0 for p in engine.scheduler.pools)


def test_graph_steps_pad_reward_streams_and_fall_back(qwen2, tokenizer):
    """One model serving base and reward streams (one KV pool): requests with 0 to 3 preferences, so
    reward streams are padded apart from rows; a top-k above the fused sampler's 256 runs eagerly."""
    base, _, params = random_batch(len(tokenizer), n=12, seed=5)
    rng = random.Random(5)
    multi = [[([rng.randrange(4, 300) for _ in range(5)] + b, (1.0, -0.5, 0.5)[j]) for j in range(i % 4)] or
             [(b, 0.0)] for i, b in enumerate(base)]
    params[3].top_k = 270
    engine = Engine(qwen2, qwen2, block_size=8, cuda_graphs=True)
    counts = spy_graphs(engine)
    assert generate(engine, base, multi, params) == reference(qwen2, qwen2, base, multi, params)
    assert counts["graph"] > 0 and counts["eager"] > 0
    assert any(rows != rewards for rows, rewards, *_ in engine.runner.graphs.graphs)


def test_graph_sampling_equals_eager_sampling(llama, persrm, tokenizer):
    base, reward, _ = random_batch(len(tokenizer), n=6, seed=2)
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_k=(0, 5, 40)[i % 3], seed=i, weight=1.0)
              for i in range(6)]
    graphs = Engine(llama, persrm, block_size=4, cuda_graphs=True)
    eager = Engine(llama, persrm, block_size=4)
    a = graphs.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    b = eager.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def test_graph_steps_with_triton_kernels(llama, persrm, tokenizer):
    """The fused sampler, paged decode attention at the graphs' full table width and the KV write
    skipping nothing (padding writes to the sink block), in Triton's interpreter."""
    base, reward, params = random_batch(len(tokenizer), n=3, seed=8)
    for p in params:
        p.max_tokens = 3
    engine = Engine(llama, persrm, block_size=16, kernels="triton", cuda_graphs=True, max_model_len=64)
    counts = spy_graphs(engine)
    assert generate(engine, base, reward, params) == reference(llama, persrm, base, reward, params)
    assert counts["graph"] > 0


def test_graph_steps_base_alone_with_sliding_window(mistral, tokenizer):
    """No reward model (no reward rows in any graph) and a sliding window that contexts outgrow."""
    base, _, params = random_batch(len(tokenizer), n=8, seed=4)
    engine = Engine(mistral, block_size=16, cuda_graphs=True)
    counts = spy_graphs(engine)
    assert generate(engine, base, None, params) == reference(mistral, None, base, base, params)
    assert counts["graph"] > 0 and all(rewards == 0 for _, rewards, *_ in engine.runner.graphs.graphs)


def test_which_rows_a_graph_holds():
    from padengine.executor.cuda_graphs import graphable
    vocab = 1000
    assert graphable(SamplingParams(top_k=10, top_p=0.5, top_logprobs=3), vocab)
    assert graphable(SamplingParams(top_k=0), vocab)
    assert not graphable(SamplingParams(top_k=0, top_p=0.5), vocab)          # left to the torch fallback
    assert not graphable(SamplingParams(top_k=0, top_logprobs=2), vocab)
    assert not graphable(SamplingParams(top_k=300), vocab)
    for k in (10, 0):                                                         # occurrence lists vary in size
        assert not graphable(SamplingParams(top_k=k, frequency_penalty=0.5), vocab)


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("num_kv_blocks", [None, 44])
def test_async_graph_steps_across_new_buckets(llama, persrm, tokenizer, sampled, num_kv_blocks):
    """Asynchronous scheduling with graph steps (CUDA's default) gives the synchronous eager loop's tokens
    (and the transformers reference's, greedy) across each new bucket's first step, also under preemption."""
    plan, (base, reward, params) = joining_plan(tokenizer, sampled)
    runs = {}
    for graphs, asynchronous in ((False, False), (True, True), (True, False)):
        engine = Engine(llama, persrm, block_size=4, num_kv_blocks=num_kv_blocks, cuda_graphs=graphs,
                        async_scheduling=asynchronous)
        reqs = interleave(engine, plan)
        runs[graphs, asynchronous] = [reqs[i].output_ids for i in range(len(plan))]
        if graphs:
            assert {rows for rows, *_ in engine.runner.graphs.graphs} >= {1, 4}
            if num_kv_blocks is None:
                assert 16 in {rows for rows, *_ in engine.runner.graphs.graphs}
            else:
                assert sum(r.metrics.num_preemptions for r in reqs.values()) > 0
    assert runs[True, True] == runs[True, False] == runs[False, False]
    if not sampled:
        assert runs[False, False] == reference(llama, persrm, base, reward, params)


def test_first_step_of_a_bucket_runs_twice_and_replays_read_only_static_inputs(llama, persrm, tokenizer,
                                                                              monkeypatch):
    """The emulation is faithful where it matters: a bucket's first step is computed twice (warm-up and
    replay), and a replay computes from the graph's own input buffers: left unrefilled, the tokens change."""
    base, reward, params = random_batch(len(tokenizer), n=3, seed=42)
    for p in params:
        p.max_tokens, p.ignore_eos = 8, True
    engine = Engine(llama, persrm, block_size=4, cuda_graphs=True, async_scheduling=True)
    runner, calls = engine.runner, []
    compute = runner.graphs.compute
    monkeypatch.setattr(runner.graphs, "compute", lambda x: (calls.append(x), compute(x))[1])
    counts = spy_graphs(engine)
    expected = reference(llama, persrm, base, reward, params)
    assert generate(engine, base, reward, params) == expected
    graphs = runner.graphs.graphs.values()
    static = [[i for i, x in enumerate(calls) if x is g.inputs] for g in graphs]
    assert counts["graph"] > 3 and sum(map(len, static)) == counts["graph"] + len(graphs)
    assert all(steps[1] == steps[0] + 1 for steps in static)       # warm-up, then the first replay
    upload = runner.graphs.upload

    def no_refill(values, dtype, out=None):
        refill = out is not None and any(out is g.ints or out is g.floats for g in runner.graphs.graphs.values())
        return out if refill else upload(values, dtype, out)

    monkeypatch.setattr(runner.graphs, "upload", no_refill)
    assert generate(engine, base, reward, params) != expected
