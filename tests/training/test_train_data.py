"""The pair-data format: bad lines are errors naming the line and the field; prompts render as the engine's."""
import json

import pytest

from padengine.errors import InvalidInput
from padengine.prompts import render
from padengine.training.data import read_pairs, tokenize_pair, write_pairs

PAIR = {"prompt": "Name a color.", "preference": "Be brief.", "chosen": "red.", "rejected": "The color red, surely."}


def write(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


def test_round_trip(tmp_path):
    path = str(tmp_path / "out" / "pairs.jsonl")
    write_pairs([PAIR, dict(PAIR, chosen="blue.")], path)
    assert read_pairs(path) == [PAIR, dict(PAIR, chosen="blue.")]


@pytest.mark.parametrize("line, match", [
    ("{not json", r"data line 2: not valid JSON"),
    ('["a list"]', r"data line 2: must be a JSON object"),
    ({k: v for k, v in PAIR.items() if k != "rejected"}, r"data line 2: rejected: missing"),
    (dict(PAIR, preference=3), r"data line 2: preference: must be a non-empty string"),
    (dict(PAIR, chosen="  "), r"data line 2: chosen: must be a non-empty string"),
    (dict(PAIR, score=1.0), r"data line 2: score: unknown field"),
    (dict(PAIR, rejected=PAIR["chosen"]), r"data line 2: rejected: is the same text as chosen"),
])
def test_bad_lines_name_line_and_field(tmp_path, line, match):
    with pytest.raises(InvalidInput, match=match):
        read_pairs(write(tmp_path, [PAIR, line]))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidInput, match="does not exist"):
        read_pairs(str(tmp_path / "none.jsonl"))
    with pytest.raises(InvalidInput, match="has no pairs"):
        read_pairs(write(tmp_path, ["", " "]))


def test_prompt_tokens_are_the_engines_reward_prompt(tokenizer):
    ids = tokenize_pair(tokenizer, PAIR)
    _, rewards = render(tokenizer, tokenizer, PAIR["prompt"], [(PAIR["preference"], 1.0)], False, True)
    assert ids["prompt_ids"] == rewards[0][0]
    assert ids["chosen_ids"] == tokenizer.encode("red.", add_special_tokens=False) + [tokenizer.eos_token_id]
