"""The command line: generate, bench, demo and serve's --help, run as real processes."""
import json
import subprocess
import sys

import pytest


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "padengine", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", ["demo", "generate", "serve", "bench"])
def test_help(command):
    out = cli(command, "--help")
    assert out.returncode == 0 and "usage: padengine " + command in out.stdout


def test_demo_needs_no_triton_and_exits_quietly(llama):
    """A CPU command imports no Triton: building a model on `meta` once initialized its weights there,
    which imported torch._dynamo and Triton with it, whose bindings then printed `nanobind: leaked ...`."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['padengine', 'demo', '--model', {llama!r}, '--max-tokens', '2']\n"
            "try:\n    runpy.run_module('padengine', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('triton imported:', 'triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PAD-guided" in out.stdout and "triton imported: False" in out.stdout
    assert "leaked" not in out.stderr


def test_generate_jsonl(llama, persrm, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "the sea", "preference": "be concise"}) + "\n"
                   + json.dumps({"prompt": "a computer"}) + "\n")
    out = cli("generate", "--model", llama, "--reward", persrm, "--input", str(src), "--max-tokens", "5",
              "--weight", "1.5", "--output", str(tmp_path / "out.jsonl"))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["preference"] for r in rows] == ["be concise", None]
    assert all(1 <= len(r["token_ids"]) <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert "PAD generate" in out.stderr                                   # the progress bar
    direct = cli("generate", "--model", llama, "the sea", "a computer", "--max-tokens", "3")
    assert direct.returncode == 0 and len(direct.stdout.splitlines()) == 2


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/no/such/model", "hi"], "base_model: model folder '/no/such/model' does not exist"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens: must be at least 1"),
    (["generate", "--input", "/no/such/file.jsonl"], "No such file"),
    (["generate"], "prompts"),
])
def test_user_mistakes_exit_cleanly(llama, args, message):
    if "--model" not in args:
        args = args + ["--model", llama]
    out = cli(*args)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr


def test_bench_and_demo(llama, persrm, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": f"question {i} about the sea"} for i in range(6)]))
    out = cli("bench", "--model", llama, "--reward", persrm, "--prompts", str(prompts), "--num-prompts", "6",
              "--max-tokens", "4", "--request-rate", "50", "--json", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr
    assert "time to first token" in out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["output_tokens"] == 24 and result["ttft_s"]["p99"] >= result["ttft_s"]["p50"] > 0
    demo = cli("demo", "--model", llama, "--max-tokens", "4", "the quick brown fox")
    assert demo.returncode == 0 and "PAD-guided" in demo.stdout
