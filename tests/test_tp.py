"""Tensor parallelism and role placement on CPU processes (gloo): the same float32 greedy tokens as one
process and the transformers reference, the distributed sampler against `pad_sample`, and a worker that
dies or hangs raising `WorkerError` instead of a hang. Every engine here starts worker processes (each
imports torch and loads its shards), so there are few of them, on the tiny models."""
import gc
import os
import random
import shutil
import signal
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from padengine import Engine, InvalidInput, SamplingParams
from padengine.errors import EngineClosed
from padengine.distributed.parallel import Shard
from padengine.distributed.sampler import tp_candidates, tp_logprobs
from padengine.executor.workers import WorkerError
from padengine.layers.sampler import candidate_scores, choose, merge_rewards, pad_sample
from tests.helpers import random_batch, reference


def run(engine, base, reward, params):
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    return [o.token_ids for o in outs], outs


def several_preferences(base, seed):
    rng = random.Random(seed)
    return [[([rng.randrange(4, 300) for _ in range(rng.randrange(3, 10))] + b, w)
             for w in (0.5, 1.0, -0.5)[:1 + i % 3]] for i, b in enumerate(base)]


def options_batch(vocab):
    """Seeded draws with top-p / min-p, penalties, alternatives and base log-probabilities."""
    base, reward, _ = random_batch(vocab, n=6, seed=21)
    params = [SamplingParams(max_tokens=10, top_k=(5, 0, 12)[i % 3], weight=1.0, temperature=(0, 0.8)[i % 2],
                             seed=i, top_p=0.9, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.4,
                             top_logprobs=3, base_logprobs=True, ignore_eos=True) for i in range(6)]
    return base, reward, params


def test_tensor_parallel_matches_one_process_and_reference(llama, qwen3_persrm, tokenizer):
    """TP=2: a tied llama base with 2 KV heads (one per rank) and an untied Qwen3 PersRM with one KV head
    (replicated), a value head, biases and q/k norms; with preemption and several preferences."""
    base, reward, params = random_batch(len(tokenizer), n=16, seed=1)
    multi = several_preferences(base, seed=2)
    opt = options_batch(len(tokenizer))
    single = Engine(llama, qwen3_persrm, block_size=4, num_kv_blocks=40, kernels="torch")
    expected = [run(single, b, r, p) for b, r, p in ((base, reward, params), (base, multi, params), opt)]
    assert expected[0][0] == reference(llama, qwen3_persrm, base, reward, params)
    assert expected[1][0] == reference(llama, qwen3_persrm, base, multi, params)
    engine = Engine(llama, qwen3_persrm, block_size=4, num_kv_blocks=40, kernels="torch", tensor_parallel_size=2)
    try:
        assert engine.runner.models[1].model.layers[0].self_attn.kv_heads == 1
        assert engine.runner.models[0].lm_head.out_features < len(tokenizer)        # a vocabulary slice
        for (want, want_outs), (b, r, p) in zip(expected, ((base, reward, params), (base, multi, params), opt)):
            got, outs = run(engine, b, r, p)
            assert got == want
            for o, w in zip(outs, want_outs):
                assert o.logprobs == pytest.approx(w.logprobs, abs=1e-4)
                assert [i for i, _ in o.top_logprobs[0]] == [i for i, _ in w.top_logprobs[0]]
                assert (o.base_logprobs is None) == (w.base_logprobs is None)
                if o.base_logprobs:
                    assert o.base_logprobs == pytest.approx(w.base_logprobs, abs=1e-4)
        assert sum(o.metrics.num_preemptions for o in run(engine, base, reward, params)[1]) > 0
    finally:
        engine.close()


def test_reward_model_on_its_own_process_and_a_hung_worker(llama, persrm, tokenizer):
    """Role placement: the PersRM (vocabulary padded wider, value head) on rank 1 equals one process.
    Then a stopped reward worker makes the step raise WorkerError after worker_timeout, not hang."""
    base, reward, params = random_batch(len(tokenizer), n=12, seed=3)
    multi = several_preferences(base, seed=4)
    single = Engine(llama, persrm, block_size=4, kernels="torch")
    expected = [run(single, base, r, params)[0] for r in (reward, multi)]
    engine = Engine(llama, persrm, block_size=4, kernels="torch", reward_device="cpu", worker_timeout=5)
    try:
        assert engine.runner.models[1] is None and engine.runner.placement.reward_apart
        for r, want in zip((reward, multi), expected):
            assert run(engine, base, r, params)[0] == want
            time.sleep(6)       # idle for longer than worker_timeout: the workers wait on
        worker = engine.runner.workers.procs[0]
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(WorkerError):
            run(engine, base, reward, params)
        assert time.monotonic() - start < 60
        assert not worker.is_alive()
        with pytest.raises(WorkerError, match="stopped"):
            run(engine, base, reward, params)
    finally:
        engine.close()


def test_a_killed_worker_raises_and_close_reaps_it(qwen3, tokenizer):
    """Self-guided Qwen3 (one model for both roles) at TP=2 equals the reference; then the worker is
    killed: the next step raises WorkerError naming it, and no process is left behind."""
    base, reward, params = random_batch(len(tokenizer), n=6, seed=5)
    engine = Engine(qwen3, qwen3, block_size=8, kernels="torch", tensor_parallel_size=2)
    try:
        assert run(engine, base, reward, params)[0] == reference(qwen3, qwen3, base, reward, params)
        worker = engine.runner.workers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(30)
        with pytest.raises(WorkerError, match="padengine-rank1.*exited with code -9"):
            run(engine, base, reward, params)
    finally:
        engine.close()
    assert worker.exitcode == -signal.SIGKILL and not dist.is_initialized()


def test_placement_errors_name_the_field_and_close(llama, persrm, tmp_path):
    """Refused layouts name the field; a weight file that fails to load on rank 0 raises its InvalidInput
    and leaves no worker behind. A closed engine refuses steps; a collected one has stopped its worker."""
    broken = tmp_path / "broken"
    shutil.copytree(llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    with pytest.raises(InvalidInput, match="base_model: corrupt or truncated"):
        Engine(str(broken), persrm, kernels="torch", tensor_parallel_size=2)
    assert not mp.active_children() and not dist.is_initialized()
    with pytest.raises(InvalidInput, match="tensor_parallel_size"):
        Engine(llama, persrm, kernels="torch", tensor_parallel_size=3)      # 4 heads do not split over 3
    with pytest.raises(InvalidInput, match="reward_device"):
        Engine(llama, llama, kernels="torch", reward_device="cpu")
    with pytest.raises(InvalidInput, match="cuda_graphs"):
        Engine(llama, persrm, tensor_parallel_size=2, cuda_graphs=True)
    with pytest.raises(InvalidInput, match="tensor_parallel_size"):
        Engine(llama, persrm, tensor_parallel_size=0)
    with pytest.raises(InvalidInput, match="reward_device"):
        Engine(llama, persrm, reward_device="nowhere")
    engine = Engine(llama, persrm, kernels="torch", reward_device="cpu")
    engine.close()
    with pytest.raises(EngineClosed, match="closed"):
        engine.generate(prompt_token_ids=[[5, 6]], params=SamplingParams(max_tokens=2))
    engine = Engine(llama, persrm, kernels="torch", reward_device="cpu")
    worker = engine.runner.workers.procs[0]
    del engine
    gc.collect()
    assert not worker.is_alive() and not dist.is_initialized()


def _sampler_rank(rank: int, port: int, size: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=60))
    try:
        gen = torch.Generator().manual_seed(0)
        n, vocab, reward_vocab = 12, 301, 313        # uneven slices; the reward row padded wider
        base = torch.randn(n, vocab, generator=gen) * 3
        rows = torch.randn(16, reward_vocab, generator=gen) * 3
        owner = torch.tensor([0, 1, 1, 2, 3, 3, 3, 5, 6, 7, 8, 9, 10, 11, 11, 12])   # 12: a padding stream
        weights = torch.tensor([1.0, 0.5, 1.0, -0.5, 0.3, 0.3, 2.0, 1.0, 0.0, 1.5, 1.0, 0.7, 1.0, 0.2, 0.9, 1.0])
        top_k = torch.tensor([1, 10, 0, 400, 5, 10, 3, 301, 50, 10, 2, 20])
        temp = torch.tensor([0.0, 0.7] * 6)
        seed, position = torch.arange(n) * 7, torch.arange(n) + 3
        top_p, min_p = torch.tensor([1.0, 0.8] * 6), torch.tensor([0.0, 0.1, 0.05] * 4)
        merged, weight = merge_rewards(base, rows, owner, weights)
        want = pad_sample(base, merged, top_k, weight, temp, seed, position, top_p, min_p, max_k=301, num_top=4)

        tp = Shard(rank, size, dist.group.WORLD, -(-vocab // size))
        (b0, b1), (r0, r1) = tp.vocab_range(vocab), tp.vocab_range(reward_vocab)
        local_merged, local_weight = merge_rewards(base[:, b0:b1], rows[:, r0:r1], owner, weights)
        cand, zb, zr, invalid = tp_candidates(base[:, b0:b1], local_merged, top_k, 301, vocab, tp)
        got = choose(cand, candidate_scores(zb, zr, local_weight, invalid), temp, seed, position, top_p, min_p, 4)
        assert torch.equal(got.tokens, want.tokens)
        torch.testing.assert_close(got.logprobs, want.logprobs)
        torch.testing.assert_close(got.top_logprobs, want.top_logprobs)
        assert torch.equal(got.top_ids[:, :1], want.top_ids[:, :1])
        lp = tp_logprobs(base[:, b0:b1], want.tokens, vocab, tp)
        torch.testing.assert_close(lp, torch.log_softmax(base, -1).gather(1, want.tokens[:, None]).squeeze(1))
    finally:
        dist.destroy_process_group()


def test_distributed_sampler_equals_pad_sample():
    """Logits split across 2 ranks: local top-k, all-gathered candidates, the PAD rule on them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sampler_rank, args=(port, 2), nprocs=2)
