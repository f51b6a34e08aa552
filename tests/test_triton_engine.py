"""The engine with its Triton kernels (run by Triton's interpreter on the CPU) against the reference."""
from padengine import Engine, SamplingParams
from tests.helpers import random_batch, reference


def test_triton_kernels_engine_matches_reference(llama, persrm, tokenizer):
    base, reward, params = random_batch(len(tokenizer), n=4, seed=8)
    for p in params:
        p.max_tokens = 4
    engine = Engine(llama, persrm, block_size=16, kernels="triton")
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    assert [o.token_ids for o in outs] == reference(llama, persrm, base, reward, params)
    sampled = [SamplingParams(max_tokens=4, temperature=0.9, seed=i, weight=1.0) for i in range(4)]
    torch_engine = Engine(llama, persrm, block_size=16)
    a = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=sampled)
    b = torch_engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=sampled)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
