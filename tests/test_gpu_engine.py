"""The engine on CUDA (torch and Triton kernels; eager steps and captured CUDA graphs) against the
transformers reference on CUDA. flash-attn (fp16/bf16 only) is checked in tests/test_flash_attention.py."""
import pytest
import torch

from padengine import Engine
from tests.helpers import EOS, interleave, joining_plan, random_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_float32_greedy_matches_reference(llama, persrm, tokenizer, kernels, graphs):
    from benchmarks.baselines.hf_pad import HFPad
    torch.backends.cuda.matmul.allow_tf32 = False
    base, reward, params = random_batch(len(tokenizer), n=16, seed=10)
    ref = HFPad.load(llama, persrm, device="cuda")
    expected = [ref.generate(b, [(r, p.weight)], p.max_tokens, p.top_k, set() if p.ignore_eos else EOS)
                for b, r, p in zip(base, reward, params)]
    engine = Engine(llama, persrm, device="cuda", block_size=16, num_kv_blocks=24, kernels=kernels,
                    cuda_graphs=graphs)
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    assert [o.token_ids for o in outs] == expected
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    if graphs:
        captured = engine.runner.graphs.graphs.values()
        assert len(captured) > 1 and all(g.graph.cuda_graph is not None for g in captured)


def test_cuda_defaults_sample_as_the_synchronous_loop(llama, persrm, tokenizer):
    """Seeded sampling while requests join mid-run (the first step of each new graph bucket is taken while
    the step before is in flight): the defaults (graphs, asynchronous loop) draw the synchronous loop's
    tokens, and the same again."""
    plan, _ = joining_plan(tokenizer, sampled=True)
    runs = []
    for asynchronous in (True, False, True):
        with Engine(llama, persrm, device="cuda", block_size=16, num_kv_blocks=64,
                    async_scheduling=asynchronous) as engine:
            reqs = interleave(engine, plan)
            runs.append([reqs[i].output_ids for i in range(len(plan))])
    assert runs[0] == runs[1] == runs[2]


def test_closed_engine_hands_back_its_gpu_memory(llama, persrm, tokenizer):
    """The defaults (graphs, the asynchronous loop) with 8 GiB of KV pools, twice in one process: after
    close, PyTorch holds what it held before (but cuBLAS's per-stream workspaces, made once). (The default
    budget, most of the free memory, would make millions of blocks of this tiny model's.)"""
    base, reward, params = random_batch(len(tokenizer), n=4, seed=11)
    torch.cuda.synchronize()
    before, after = torch.cuda.memory_allocated(), []
    for _ in range(2):
        with Engine(llama, persrm, device="cuda", kv_cache_bytes=8 << 30) as engine:
            engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
            assert torch.cuda.memory_allocated() - before > 1 << 30         # the KV pools
        after.append(torch.cuda.memory_allocated())
    assert after[0] - before < 64 << 20 and after[1] == after[0]
