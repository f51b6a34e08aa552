"""Smoke runs of the benchmark scripts on tiny models, so they keep working between GPU sessions."""
import json
import os
import subprocess
import sys

import pytest


def run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=".")
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_gpu_bench_smoke_on_cpu(tmp_path):
    stdout = run(["benchmarks/gpu_bench.py", "--device", "cpu", "--shapes", "tiny", "--skip-kernels",
                  "--kernels", "torch", "--max-tokens", "4", "--json", str(tmp_path / "gpu.json")], tmp_path)
    rows = json.loads((tmp_path / "gpu.json").read_text())["end_to_end"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["engine_ms"] > 0 and r["sync_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert "| tiny | 2 |" in stdout and len({line.count("|") for line in table}) == 1    # header, rule, rows agree


def test_throughput_smoke(llama, persrm, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": f"question {i} about the sea"} for i in range(3)]))
    run(["benchmarks/throughput.py", "--model", llama, "--reward", persrm, "--prompts", str(prompts),
         "--num-prompts", "3", "--max-tokens", "5", "--json", str(tmp_path / "t.json")], tmp_path)
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["identical_outputs"] == 3 and result["speedup"] > 0
    assert result["batched_identical_outputs"] == 3 and result["batched_speedup"] > 0


def test_cpu_kernels_smoke(llama, tmp_path):
    stdout = run(["benchmarks/cpu_kernels.py", "--model", llama, "--shapes", "tiny", "--batches", "2",
                  "--contexts", "8", "20", "--reps", "1", "--dtype", "float32", "--json", str(tmp_path / "k.json")],
                 tmp_path)
    rows = json.loads((tmp_path / "k.json").read_text())["float32"]
    assert {r["op"] for r in rows} >= {"attention + KV write", "PAD sampler", "layer matmuls, packed", "full",
                                       "matmuls"}
    assert all(r["torch"][0] > 0 and r["cpp"][0] > 0 for r in rows) and "speedup" in stdout
    assert "its linear layers' time" in stdout and "attention" in stdout.split("op by op in place")[1]


def test_prefill_stall_smoke(llama, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": f"write a short poem about the sea number {i}"} for i in range(12)]))
    stdout = run(["benchmarks/prefill_stall.py", "--model", llama, "--prompts", str(prompts), "--running", "2",
                  "--long-tokens", "60", "--chunk", "16", "--max-tokens", "4", "--json", str(tmp_path / "s.json")],
                 tmp_path)
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["chunked"]["max_num_batched_tokens"] == 16 and result["whole"]["max_gap_ms"] > 0
    assert "| chunked | 16 |" in stdout


@pytest.mark.parametrize("replay", [[], ["--replay"]])
def test_host_overhead_smoke(tmp_path, replay):
    stdout = run(["benchmarks/host_overhead.py", "--batches", "1", "3", "--steps", "3", "--json",
                  str(tmp_path / "h.json"), *replay], tmp_path)
    rows = json.loads((tmp_path / "h.json").read_text())
    assert [(r["batch"], r["async"]) for r in rows] == [(1, False), (1, True), (3, False), (3, True)]
    assert all(r["host_ms"] > 0 and r["schedule"] > 0 and r["layout"] > 0 for r in rows)
    assert "batch    3 async True" in stdout


def test_tp_overhead_smoke(tmp_path):
    """Three processes (TP 2 plus the PersRM on a rank of its own) decode one process's tokens."""
    stdout = run(["benchmarks/tp_overhead.py", "--batches", "2", "--steps", "3", "--layouts", "tp1", "tp2+reward",
                  "--json", str(tmp_path / "tp.json")], tmp_path)
    rows = json.loads((tmp_path / "tp.json").read_text())
    assert [r["layout"] for r in rows] == ["tp1", "tp2+reward"] and all(r["same"] for r in rows)
    assert rows[0]["calls"] == 0 and rows[1]["calls"] > 0 and "| tp2+reward | 2 |" in stdout
