"""The engine's float32 greedy output equals a transformers implementation of PAD, token for token.

The core cases run on both CPU op sets, the torch references and the C++ kernels (`kernels`)."""
import json
import random
import shutil

import pytest

from padengine import Engine, InvalidInput, SamplingParams
from padengine.prompts import user_message
from tests.helpers import add_stop_tokens, random_batch, reference


BOTH_CPU_KERNELS = pytest.mark.parametrize("kernels", ["torch", "cpp"])


def run(engine, base, reward, params):
    outs = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    return outs, [o.token_ids for o in outs]


@BOTH_CPU_KERNELS
def test_batch_matches_reference(llama, persrm, tokenizer, kernels):
    base, reward, params = random_batch(len(tokenizer), n=18)
    expected = add_stop_tokens(params, reference(llama, persrm, base, reward, params))
    engine = Engine(llama, persrm, block_size=4, kernels=kernels)
    outs, got = run(engine, base, reward, params)
    assert got == expected
    assert {o.finish_reason for o in outs} == {"stop", "length"}
    assert all(o.prompt_token_ids == b for o, b in zip(outs, base))


@BOTH_CPU_KERNELS
def test_preemption_matches_reference(llama, persrm, tokenizer, kernels):
    base, reward, params = random_batch(len(tokenizer), n=16, seed=1)
    engine = Engine(llama, persrm, block_size=4, num_kv_blocks=40, kernels=kernels)
    outs, got = run(engine, base, reward, params)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert got == reference(llama, persrm, base, reward, params)
    assert all(p.num_used == 0 for p in engine.scheduler.pools)


@BOTH_CPU_KERNELS
def test_prefix_cache_matches_reference(llama, persrm, tokenizer, kernels):
    base, reward, params = random_batch(len(tokenizer), n=16, seed=2, shared_prefix=20)
    engine = Engine(llama, persrm, block_size=4, kernels=kernels)
    expected = reference(llama, persrm, base, reward, params)
    outs, got = run(engine, base, reward, params)
    assert got == expected
    assert sum(o.metrics.num_cached_tokens for o in outs) >= 15 * 20 // 4 * 4
    outs, again = run(engine, base, reward, params)     # finished requests' blocks serve the repeat
    assert again == expected
    assert all(o.metrics.num_cached_tokens >= 16 for o in outs)


@pytest.mark.parametrize("fixture", ["qwen2", "mistral", "qwen3", "qwen3_persrm"])
@BOTH_CPU_KERNELS
def test_self_guided_shares_one_model(fixture, request, tokenizer, kernels):
    path = request.getfixturevalue(fixture)
    base, reward, params = random_batch(len(tokenizer), n=16, seed=3)
    engine = Engine(path, path, block_size=8, kernels=kernels)
    assert len(engine.runner.models) == 1 and len(engine.scheduler.pools) == 1
    _, got = run(engine, base, reward, params)
    assert got == reference(path, path, base, reward, params)


@pytest.mark.parametrize("base_fixture, reward_fixture", [("qwen3", "persrm"), ("llama", "qwen3_persrm"),
                                                          ("qwen3", "qwen3_persrm")])
@BOTH_CPU_KERNELS
def test_qwen3_as_base_and_as_reward_model(base_fixture, reward_fixture, request, tokenizer, kernels):
    """Qwen3 (per-head q/k norm, head_dim != hidden / heads) beside another model: two KV pools."""
    base_path, reward_path = request.getfixturevalue(base_fixture), request.getfixturevalue(reward_fixture)
    base, reward, params = random_batch(len(tokenizer), n=16, seed=13)
    engine = Engine(base_path, reward_path, block_size=4, kernels=kernels)
    assert engine.runner.models[0].model.layers[0].self_attn.attend is engine.runner.ops.attention
    assert len(engine.runner.models) == 2
    _, got = run(engine, base, reward, params)
    assert got == reference(base_path, reward_path, base, reward, params)


def test_qwen3_triton_kernels_match_reference(qwen3, qwen3_persrm, tokenizer):
    """The q/k norms through the Triton RMSNorm (Triton's interpreter on the CPU), head_dim 24 padded."""
    base, reward, params = random_batch(len(tokenizer), n=4, seed=14)
    for p in params:
        p.max_tokens = 4
    engine = Engine(qwen3, qwen3_persrm, block_size=16, kernels="triton")
    import triton_kernels
    assert engine.runner.models[0].model.layers[0].self_attn.q_norm.kernel is triton_kernels.rms_norm
    _, got = run(engine, base, reward, params)
    assert got == reference(qwen3, qwen3_persrm, base, reward, params)


@pytest.mark.parametrize("change, match", [
    (dict(use_sliding_window=True, sliding_window=24, max_window_layers=1), "use_sliding_window"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 64}), "rope_scaling: type 'yarn'")])
def test_unsupported_qwen3_config_is_refused(qwen3, tmp_path, change, match):
    """Refused before loading, naming the config field: a window on some layers only (those >=
    max_window_layers; the engine windows all layers or none) and a rope type the engine lacks."""
    path = tmp_path / "model"
    shutil.copytree(qwen3, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("layer_types", None)        # recomputed from max_window_layers
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInput, match=f"reward_model: unsupported config .*{match}"):
        Engine(qwen3, str(path))


@BOTH_CPU_KERNELS
def test_base_alone_matches_reference(mistral, tokenizer, kernels):
    base, _, params = random_batch(len(tokenizer), n=16, seed=4)
    engine = Engine(mistral, block_size=16, kernels=kernels)
    _, got = run(engine, base, None, params)
    assert got == reference(mistral, None, base, base, params)


@pytest.mark.parametrize("in_base", [True, False])
def test_text_prompts_with_preferences(llama, persrm, tokenizer, in_base):
    prompts = ["write a short poem about the sea", "explain how a computer works", "the quick brown fox"]
    prefs = ["be concise", None, "answer in french"]
    params = SamplingParams(max_tokens=12, weight=1.5, preference_in_base=in_base)
    engine = Engine(llama, persrm, block_size=4)
    outs = engine.generate(prompts, params, preferences=prefs)
    render = lambda p, pref: tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(p, pref)}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    base = [render(p, pref if in_base else None) for p, pref in zip(prompts, prefs)]
    reward = [render(p, pref) for p, pref in zip(prompts, prefs)]
    assert "[Principles] be concise [Instruction] write" in tokenizer.decode(reward[0])
    assert [o.prompt_token_ids for o in outs] == base
    assert [o.token_ids for o in outs] == reference(llama, persrm, base, reward, [params] * 3)
    assert all(o.text == tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs)


@BOTH_CPU_KERNELS
def test_several_weighted_preferences_match_reference(llama, persrm, tokenizer, kernels):
    """Each (preference, weight) is its own reward stream: score = z_b + sum_j w_j (lsm(z_r_j) - lsm(z_b))."""
    base, reward, params = random_batch(len(tokenizer), n=16, seed=6, shared_prefix=6)
    rng = random.Random(6)
    multi = []
    for i, (b, r) in enumerate(zip(base, reward)):
        prefs = [[rng.randrange(4, 300) for _ in range(rng.randrange(3, 12))] + b for _ in range(1 + i % 3)]
        multi.append([(p, w) for p, w in zip(prefs, [(0.5, 1.0, -0.5, 2.0)[(i + j) % 4] for j in range(3)])])
    expected = reference(llama, persrm, base, multi, params)
    engine = Engine(llama, persrm, block_size=4, num_kv_blocks=60, kernels=kernels)
    outs, got = run(engine, base, multi, params)
    assert got == expected
    assert [len(o.reward_prompt_token_ids) for o in outs] == [len(m) for m in multi]
    assert sum(o.metrics.num_preemptions for o in outs) > 0          # all streams preempted together
    assert all(p.num_used == 0 for p in engine.scheduler.pools)


def test_one_weighted_preference_equals_single_preference(llama, persrm, tokenizer):
    base, reward, params = random_batch(len(tokenizer), n=16, seed=7)
    for p in params:
        p.weight = p.weight or 1.0
    engine = Engine(llama, persrm, block_size=4)
    single = engine.generate(prompt_token_ids=base, reward_prompt_token_ids=reward, params=params)
    pairs = engine.generate(prompt_token_ids=base, params=params,
                            reward_prompt_token_ids=[[(r, p.weight)] for r, p in zip(reward, params)])
    assert [o.token_ids for o in single] == [o.token_ids for o in pairs]
    for a, b in zip(single, pairs):        # the second run reads prefix-cached KV: equal up to rounding
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    text = engine.generate(["write a poem"], SamplingParams(max_tokens=8, weight=1.5),
                           preferences=[[("be concise", 1.5)]])
    assert text[0].token_ids == engine.generate(["write a poem"], SamplingParams(max_tokens=8, weight=1.5),
                                                preferences="be concise")[0].token_ids


def test_text_prompt_with_two_preferences(llama, persrm, tokenizer):
    engine = Engine(llama, persrm, block_size=4)
    prefs = [("be concise", 1.0), ("answer in french", 0.5)]
    out = engine.generate(["explain how a computer works"], SamplingParams(max_tokens=10, preference_in_base=False),
                          preferences=[prefs])[0]
    render = lambda pref: tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message("explain how a computer works", pref)}], tokenize=False,
        add_generation_prompt=True), add_special_tokens=False)
    assert out.prompt_token_ids == render(None)
    assert out.reward_prompt_token_ids == [render("be concise"), render("answer in french")]
    assert out.token_ids == reference(llama, persrm, [render(None)], [[(render(t), w) for t, w in prefs]],
                                      [SamplingParams(max_tokens=10)])[0]


def test_batched_baseline_equals_one_at_a_time(llama, persrm, tokenizer):
    """The GPU benchmark's left-padded transformers baseline computes what the reference computes."""
    from benchmarks.baselines.hf_pad import HFPad
    base, reward, _ = random_batch(len(tokenizer), n=6, seed=9)
    ref = HFPad.load(llama, persrm)
    batched = ref.generate_batch(base, [reward], [1.5], max_tokens=10, top_k=10)
    assert batched == [ref.generate(b, [(r, 1.5)], max_tokens=10, top_k=10) for b, r in zip(base, reward)]


@BOTH_CPU_KERNELS
def test_requests_joining_a_running_batch_match_reference(llama, persrm, tokenizer, kernels):
    """With room for 4 requests at a time, each step decodes the running ones and prefills newcomers in
    the same forward pass."""
    base, reward, params = random_batch(len(tokenizer), n=16, seed=11)
    engine = Engine(llama, persrm, block_size=4, max_num_seqs=4, kernels=kernels)
    mixed_steps = []
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        mixed_steps.append(bool(batch.decode) and bool(batch.prefill))
        return batch

    engine.scheduler.schedule = spy
    _, got = run(engine, base, reward, params)
    assert any(mixed_steps)
    assert got == reference(llama, persrm, base, reward, params)


def test_failed_step_leaves_no_uncomputed_blocks_in_the_prefix_cache(llama, persrm, tokenizer, monkeypatch):
    base, reward, params = random_batch(len(tokenizer), n=4, seed=12, shared_prefix=24)
    engine = Engine(llama, persrm, block_size=4)
    launch = engine.runner.launch

    def fail(batch):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "launch", fail)
    with pytest.raises(RuntimeError):
        run(engine, base, reward, params)
    monkeypatch.setattr(engine.runner, "launch", launch)
    outs, got = run(engine, base, reward, params)
    assert got == reference(llama, persrm, base, reward, params)
    assert outs[0].metrics.num_cached_tokens == 0 and outs[0].metrics.num_prompt_tokens == len(base[0])
    assert all(p.num_used == 0 for p in engine.scheduler.pools)
