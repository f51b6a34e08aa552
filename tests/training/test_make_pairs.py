"""make-pairs on a tiny model with a stub checker, and the prompt source that leaves the evaluation prompts out."""
import json
import os

import pytest

import padengine
from padengine import Engine
from padengine.errors import InvalidInput
from padengine.prompts import EVAL_PROMPTS
from padengine.training.checkers import Checker
from padengine.training.make_pairs import PairConfig, load_prompts, make_pairs

# passes on an even number of characters; the transform appends one character to an odd answer
STUB = Checker("even", "even", "Answer with an even number of characters.", lambda t: len(t) % 2 == 0,
               lambda t: t + "." if len(t) % 2 else None)
NEVER = Checker("never", "never", "Answer with a secret.", lambda t: False)


def test_pairs_from_sampled_answers(llama):
    engine = Engine(llama, llama)
    prompts = ["write a short poem", "explain how a computer works", "answer in french", "the lazy dog"]
    cfg = PairConfig(samples=3, bare_samples=2, max_tokens=10, seed=7)
    pairs, stats = make_pairs(engine, prompts, [STUB, NEVER], cfg)
    assert pairs and all(STUB.check(p["chosen"]) and not STUB.check(p["rejected"]) for p in pairs)
    assert {p["preference"] for p in pairs} == {STUB.text}       # `never` passes nothing and has no transform
    assert stats["never"]["none"] == 4 and stats["never"]["passing"] == 0
    s = stats["even"]
    assert s["answers"] == 4 * 5 and s.get("sampled", 0) + s.get("transformed", 0) == len(pairs)
    again, _ = make_pairs(engine, prompts, [STUB, NEVER], cfg)
    assert again == pairs                                        # seeded: the same pairs again


def test_bad_config_names_the_flag(llama):
    with pytest.raises(InvalidInput, match="--samples"):
        make_pairs(None, ["p"], [STUB], PairConfig(samples=0))
    with pytest.raises(InvalidInput, match="--temperature"):
        make_pairs(None, ["p"], [STUB], PairConfig(temperature=0))


def test_prompts_leave_the_evaluation_set_out(tmp_path):
    held = tmp_path / "eval.json"
    held.write_text(json.dumps([{"id": "0", "prompt": "Why is the sky  blue?"}]))
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps([{"instruction": "why is the sky blue?", "dataset": "oasst"},
                                  {"instruction": "Tell me a joke.", "dataset": "koala"},
                                  {"instruction": "Name a color.", "dataset": "oasst"}, "Plain string prompt."]))
    assert load_prompts(str(source), exclude=str(held)) == ["Name a color.", "Plain string prompt."]
    assert load_prompts(str(source), limit=1, max_chars=13, exclude=str(held)) == ["Name a color."]
    with pytest.raises(InvalidInput, match="exclude: the evaluation prompts .* are missing"):
        load_prompts(str(source), exclude=str(tmp_path / "gone.json"))
    source.write_text(json.dumps([{"text": "no prompt key"}]))
    with pytest.raises(InvalidInput, match=r"prompts\[0\]"):
        load_prompts(str(source))


def test_the_evaluation_prompts_ship_with_the_package():
    """The 50 P-Soups prompts are the package's own data (a fresh clone has no ../shared), and the
    default exclusion reads them."""
    with open(EVAL_PROMPTS, encoding="utf-8") as f:
        rows = json.load(f)
    assert len(rows) == 50 and all(r["prompt"].strip() for r in rows)
    package = os.path.dirname(os.path.abspath(padengine.__file__))
    assert os.path.abspath(EVAL_PROMPTS).startswith(package + os.sep)
