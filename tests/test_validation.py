"""Bad input: a ValueError naming the field, raised before any work, leaving the engine usable."""
import json
import os
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from padengine import Engine, InvalidInput, SamplingParams


@pytest.fixture(scope="module")
def engine(llama, persrm):
    return Engine(llama, persrm, block_size=4, max_model_len=160)


def copy_model(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kwargs,field", [
    (dict(), "prompts"),
    (dict(prompts=[]), "prompts"),
    (dict(prompts=["ok", "  "]), "prompts[1]"),
    (dict(prompt_token_ids=[[5, 6], []]), "prompt_token_ids[1]"),
    (dict(prompts=["the sea"], params=SamplingParams(max_tokens=158)), "prompts[0]"),
    (dict(prompt_token_ids=[[5] * 40], params=SamplingParams(max_tokens=130)), "prompt_token_ids[0]"),
    (dict(prompts=["a"], params=SamplingParams(max_tokens=0)), "params.max_tokens"),
    (dict(prompts=["a"], params=SamplingParams(top_k=-1)), "params.top_k"),
    (dict(prompts=["a"], params=SamplingParams(temperature=-0.1)), "params.temperature"),
    (dict(prompts=["a"], params=SamplingParams(temperature=float("nan"))), "params.temperature"),
    (dict(prompts=["a"], params=SamplingParams(temperature=float("inf"))), "params.temperature"),
    (dict(prompts=["a"], params=SamplingParams(weight=float("nan"))), "params.weight"),
    (dict(prompts=["a"], params=SamplingParams(weight=float("-inf"))), "params.weight"),
    (dict(prompts=["a"], params=SamplingParams(seed=2**64)), "params.seed"),
    (dict(prompts=["a", "b"], params=[SamplingParams(), SamplingParams(max_tokens=-3)]), "params[1].max_tokens"),
    (dict(prompts=["a", "b"], params=[SamplingParams()]), "params"),
    (dict(prompts=["a", "b"], preferences=["x"]), "preferences"),
    (dict(prompt_token_ids=[[5, 6]], preferences="be brief"), "preferences"),
    (dict(prompts=["a"], preferences=[""]), "preferences[0]"),
    (dict(prompts=["a"], preferences=[[]]), "preferences[0]"),
    (dict(prompts=["a"], preferences=[[("x", 1.0), ("", 1.0)]]), "preferences[0][1]"),
    (dict(prompts=["a"], preferences=[[("x", float("nan"))]]), "preferences[0][0].weight"),
    (dict(prompts=["a"], preferences=[[("x", 1.0, 2.0)]]), "preferences[0][0]"),
    (dict(prompts=["a"], preferences=[[("x", 1000.0)]]), "preferences[0][0].weight"),       # |w| <= MAX_WEIGHT
    (dict(prompts=["a"], preferences=[[{"text": "x", "weight": 1.0}, {"text": " "}]]), "preferences[0][1]"),
    (dict(prompts=["a"], preferences=[[{"text": "x", "wieght": 1.0}]]), "preferences[0][0]"),
    (dict(prompts=["a"], params=SamplingParams(weight=101.0)), "params.weight"),
    (dict(prompts=["a"], params=SamplingParams(temperature=1e-5)), "params.temperature"),
    (dict(prompts=["a"], params=SamplingParams(temperature=101.0)), "params.temperature"),
    (dict(prompts=["a"], params=SamplingParams(top_p=0.0)), "params.top_p"),
    (dict(prompts=["a"], params=SamplingParams(top_logprobs=21)), "params.top_logprobs"),
    (dict(prompts=["a"], params=SamplingParams(n=0)), "params.n"),
    (dict(prompt_token_ids=[[5]], reward_prompt_token_ids=[[([5, 10**6], 1.0)]]), "reward_prompt_token_ids[0][0]"),
    (dict(prompt_token_ids=[[5]], reward_prompt_token_ids=[[([5], "x")]]), "reward_prompt_token_ids[0][0].weight"),
    (dict(prompt_token_ids=[[5]], reward_prompt_token_ids=[[([5], -1e9)]]), "reward_prompt_token_ids[0][0].weight"),
    (dict(prompt_token_ids=[[5]], reward_prompt_token_ids=[[]]), "reward_prompt_token_ids[0]"),
    (dict(prompts=["a"], params=SamplingParams(stop_token_ids=[10**6])), "params.stop_token_ids"),
    (dict(prompt_token_ids=[[5, -1]]), "prompt_token_ids[0]"),
    (dict(prompt_token_ids=[[5, 300]]), "prompt_token_ids[0]"),
    (dict(prompt_token_ids=[[5, 6]], reward_prompt_token_ids=[[5, 10**5]]), "reward_prompt_token_ids[0]"),
    (dict(prompt_token_ids=[[5, 6]], reward_prompt_token_ids=[[5], [6]]), "reward_prompt_token_ids"),
])
def test_bad_request_names_field_and_does_no_work(engine, kwargs, field):
    with pytest.raises(ValueError) as err:
        engine.generate(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(field)
    assert not engine.scheduler.has_work()
    assert all(p.num_used == 0 for p in engine.scheduler.pools)


def test_preference_forms_are_one_parser(engine, tokenizer):
    """The Python API and the server share `padengine.prompts`: a preference given as (text, weight) pairs or
    as {"text", "weight"} objects is the same request, and a text prompt is rendered with the chat template."""
    from padengine.prompts import encode, preference_pairs, render, user_message
    assert preference_pairs([{"text": "be brief", "weight": 1.5}, {"text": "be kind"}], 0.7, "p") == \
        preference_pairs([("be brief", 1.5), ("be kind", 0.7)], 0.7, "p") == [("be brief", 1.5), ("be kind", 0.7)]
    assert preference_pairs("be brief", 0.7, "p") == [("be brief", 0.7)] and preference_pairs(None, 1, "p") == []
    with pytest.raises(InvalidInput) as err:
        preference_pairs([("a", 1.0)] * 3, 1.0, "preference", max_count=2)
    assert err.value.field == "preference"
    params = SamplingParams(max_tokens=3, preference_in_base=False)
    pairs = engine.generate(["the sea"], params, preferences=[[("be brief", 1.5)]])[0]
    dicts = engine.generate(["the sea"], params, preferences=[[{"text": "be brief", "weight": 1.5}]])[0]
    assert pairs.token_ids == dicts.token_ids and pairs.reward_prompt_token_ids == dicts.reward_prompt_token_ids
    base, rewards = render(tokenizer, tokenizer, "the sea", [("be brief", 1.5)], False, chat_template=True)
    assert pairs.prompt_token_ids == base == encode(tokenizer, "the sea")
    assert pairs.reward_prompt_token_ids == [rewards[0][0]] == [encode(tokenizer, user_message("the sea", "be brief"))]
    raw, _ = render(tokenizer, tokenizer, "the sea", [], False, chat_template=False)     # /v1/completions
    assert raw == tokenizer.encode("the sea") != base


def test_engine_still_correct_after_bad_input(engine, llama, persrm):
    params = SamplingParams(max_tokens=8)
    before = engine.generate(prompt_token_ids=[[5, 6, 7]], params=params)[0].token_ids
    with pytest.raises(InvalidInput):
        engine.generate(prompt_token_ids=[[5, 6, 7], [9, 10**6]], params=params)
    assert engine.generate(prompt_token_ids=[[5, 6, 7]], params=params)[0].token_ids == before


def test_missing_folder():
    with pytest.raises(InvalidInput, match="base_model"):
        Engine("/nonexistent/model")


def test_missing_weight_file(llama, tmp_path):
    path = copy_model(llama, tmp_path)
    os.remove(path / "model.safetensors")
    with pytest.raises(InvalidInput, match="base_model.*no \\*.safetensors"):
        Engine(str(path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weight_file(llama, tmp_path, damage):
    path = copy_model(llama, tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x00" + os.urandom(200))
    with pytest.raises(InvalidInput, match="base_model.*corrupt or truncated"):
        Engine(str(path))


def test_missing_tensor(llama, tmp_path):
    from safetensors.torch import load_file, save_file
    path = copy_model(llama, tmp_path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(InvalidInput, match="base_model.*gate_up_proj.weight \\(part 1\\) missing"):
        Engine(str(path))


def test_unsupported_architecture(llama, tmp_path):
    path = copy_model(llama, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInput, match="base_model.*unsupported architecture 'gpt2'"):
        Engine(str(path))


def test_reward_tokenizer_must_match(llama, persrm, tmp_path):
    path = copy_model(persrm, tmp_path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["completely different words here"] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)
    with pytest.raises(InvalidInput, match="reward_model.*tokenizer vocabulary differs"):
        Engine(llama, str(path))


def test_kv_pool_too_small_for_one_request(llama, persrm):
    engine = Engine(llama, persrm, block_size=4, num_kv_blocks=6)
    with pytest.raises(InvalidInput, match="num_kv_blocks"):
        engine.generate(prompt_token_ids=[[5] * 10], params=SamplingParams(max_tokens=20))
    assert len(engine.generate(prompt_token_ids=[[5] * 10], params=SamplingParams(max_tokens=8))[0].token_ids) > 0


@pytest.mark.parametrize("kwargs,field", [(dict(dtype="int8"), "dtype"), (dict(block_size=0), "block_size"),
                                          (dict(max_num_seqs=0), "max_num_seqs"),
                                          (dict(num_kv_blocks=4, kv_cache_bytes=10), "num_kv_blocks"),
                                          (dict(max_model_len=10**6), "max_model_len"),
                                          (dict(kernels="cuda"), "kernels"), (dict(kernels="flash"), "kernels"),
                                          (dict(cuda_graphs="yes"), "cuda_graphs")])
def test_bad_engine_arguments(llama, kwargs, field):
    with pytest.raises(InvalidInput) as err:
        Engine(llama, **kwargs)
    assert err.value.field == field


def test_cuda_device_gets_an_index(monkeypatch):
    """`device="cuda"` resolves to the current device's index: torch.cuda.set_device (which the runner
    calls per thread) refuses a CUDA device without one. Checked without a GPU by faking its presence."""
    from torch.cuda._utils import _get_device_index
    from padengine.config import EngineConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cfg = EngineConfig("unused", device="cuda", dtype="bfloat16")
    assert cfg.torch_device == torch.device("cuda", 0) and _get_device_index(cfg.torch_device) == 0
    assert cfg.kernels in ("triton", "flash") and cfg.cuda_graphs
    assert EngineConfig("unused", device="cuda:0").torch_device.index == 0
