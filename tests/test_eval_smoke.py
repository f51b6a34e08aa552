"""The preference evaluation: smoke runs on two prompts of the default model, self-guided and with --persrm."""
import json
import subprocess
import sys

import pytest

from benchmarks.eval_preferences import repeated_4grams
from padengine.default_model import default_model_path


def test_repeated_4grams():
    assert repeated_4grams("a b c d a b c d") == pytest.approx(0.2) and repeated_4grams("one two three four five") == 0
    assert repeated_4grams("too short") == 0


def run(tmp_path, *flags):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "What is the capital of France?"}, {"prompt": "Name a color."}]))
    out = subprocess.run([sys.executable, "benchmarks/eval_preferences.py", "--prompts", str(prompts), "--limit", "2",
                          "--max-tokens", "6", "--out-dir", str(tmp_path), *flags],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_smoke_run_self_guided(tmp_path):
    run(tmp_path, "--weights", "1", "--pair-weights", "1", "--seeds", "1")
    result = json.loads((tmp_path / "eval_preferences.json").read_text())
    kinds = {(r["setting"], r["kind"]) for r in result["rows"]}
    assert kinds == {(s, k) for s in ("greedy", "sampled") for k in ("bare", "prompt", "pad")}
    assert all(0 <= r["adherence"] <= 1 and r["base_loglik"] < 0 for r in result["rows"])
    assert "| french | held_out_family |" in (tmp_path / "eval_preferences.md").read_text()
    assert (tmp_path / "eval_preferences.png").stat().st_size > 1000


def test_smoke_run_with_a_persrm(tmp_path):
    # the default model standing in for a trained PersRM: exercises the PAD+ rows, the split and the targets
    run(tmp_path, "--persrm", default_model_path(), "--preferences", "lowercase", "question", "--weights", "2",
        "--both-weights", "1")
    result = json.loads((tmp_path / "eval_persrm.json").read_text())
    cols = {(r["kind"], r["in_base"], r["weight"]) for r in result["rows"]}
    assert cols == {("bare", False, 0.0), ("prompt", True, 0.0), ("pad", False, 2.0), ("pad", True, 1.0)}
    assert set(result["targets"]) == {"held_in", "held_out"}
    assert result["targets"]["held_out"]["preferences"] == ["question"]
    assert "PAD+ w=1" in (tmp_path / "eval_persrm.md").read_text()
