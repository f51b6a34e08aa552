"""The engine on CUDA (torch and Triton kernels; eager steps and captured CUDA graphs) against the
transformers reference on CUDA. flash-attn (fp16/bf16 only) is checked in tests/test_flash_attention.py."""
import pytest
import torch

from padengine import Engine
from tests.helpers import EOS, random_batch

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
        assert len(captured) > 1 and all(g.graph is not None for g in captured)
