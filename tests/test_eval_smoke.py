"""The preference evaluation: its adherence checks, and a smoke run on two prompts of the default model."""
import json
import subprocess
import sys

from benchmarks.eval_preferences import CHECKS


def test_adherence_checks():
    ok = lambda name, text: CHECKS[name][1](text)
    assert ok("lowercase", "all small here.") and not ok("lowercase", "Not here.") and not ok("lowercase", "123")
    assert ok("short", "a few words") and not ok("short", "word " * 40) and not ok("short", "")
    assert ok("bullets", "Tips:\n- one\n* two\n3. three") and not ok("bullets", "- one\n- two")
    assert ok("no_commas", "no commas at all") and not ok("no_commas", "one, two")
    assert ok("question", "Is it?  ") and not ok("question", "It is.")
    assert ok("french", "Le chat est sur la table et il dort.")
    assert not ok("french", "The cat is on the table and it sleeps, le chat.")


def test_smoke_run_on_two_prompts(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "What is the capital of France?"}, {"prompt": "Name a color."}]))
    out = subprocess.run([sys.executable, "benchmarks/eval_preferences.py", "--prompts", str(prompts), "--limit", "2",
                          "--max-tokens", "6", "--weights", "1", "--pair-weights", "1", "--seeds", "1",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval_preferences.json").read_text())
    kinds = {(r["setting"], r["kind"]) for r in result["rows"]}
    assert kinds == {(s, k) for s in ("greedy", "sampled") for k in ("bare", "prompt", "pad")}
    assert all(0 <= r["adherence"] <= 1 for r in result["rows"])
    assert "| french |" in (tmp_path / "eval_preferences.md").read_text()
    assert (tmp_path / "eval_preferences.png").stat().st_size > 1000
