"""Host work per decode step: what the engine does between device steps, split by phase.

A 2-layer tiny random Llama (base) and a PersRM of the same shape, one reward stream per request, so the
forward is negligible and what is left is the host: scheduling, laying out the step, upload and readback,
and bookkeeping (postprocess: appending tokens, stop checks, freeing). Each phase is timed by wrapping
the engine's own methods; `compute` (the forward) is measured and left out of the host figure. Times
are the engine thread's CPU time (`time.thread_time`), so other load on a shared machine does not
inflate the host figures (its wall time would); torch runs on one thread here (the forward is tiny),
so no worker thread's spinning is counted either.

    python benchmarks/host_overhead.py [--batches 1 16 64 256] [--steps 50] [--before PATH] [--rounds 3] [--replay]
                                       [--default-model]

`--before PATH` measures this checkout and another one (e.g. `git worktree add /tmp/before <commit>`),
each in its own process, alternating over `--rounds` rounds, and prints the medians side by side as a
table; `--tree PATH` measures only that one.
`--replay` runs the forward once and replays its results: the host work then runs with its caches as
warm as a GPU-resident forward would leave them (on the CPU the forward evicts the host's code and data,
and the next few operations pay for it: most of the host figure at one request).
`--default-model` adds end-to-end tokens/s of SmolLM2-135M guiding itself (16 prompts, 32 tokens each,
greedy, float32), synchronous and asynchronous, alternating over `--rounds`.
"""
import os
import subprocess
import argparse
import json
import sys
import tempfile
import time


def build_models(root: str) -> tuple[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    vocab = 512
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(vocab)}, unk_token="t0")), eos_token="t1")
    paths = []
    for name, seed in (("base", 0), ("reward", 1)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
        path = f"{root}/{name}"
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


class Timers:
    """Wraps methods so that each call adds its wall time to a phase."""

    def __init__(self):
        self.total: dict[str, float] = {}

    def wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name, None)
        if fn is None:
            return

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[phase] = self.total.get(phase, 0.0) + time.thread_time() - start
        setattr(obj, name, timed)


def measure(base: str, reward: str, batch: int, steps: int, replay: bool = False, **engine_kwargs) -> dict:
    """`replay`: the forward runs once and its results are replayed, so the host's caches stay as warm
    as a device-resident forward leaves them (a CPU forward evicts the host's working set)."""
    from padengine import Engine, SamplingParams
    engine = Engine(base, reward, block_size=16, max_num_seqs=max(batch, 1), kernels="torch", **engine_kwargs)
    params = SamplingParams(max_tokens=steps + 64, top_k=10, weight=1.0, ignore_eos=True)
    engine.add_requests(prompt_token_ids=[[5 + i % 400, 7, 9, 11] for i in range(batch)], params=params)
    while any(r.is_prefilling or not r.output_ids for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()           # until every request decodes
    for _ in range(3):
        engine.step()
    if replay:
        compute, first = engine.runner.compute, []
        engine.runner.compute = lambda x: first[0] if first else first.append(compute(x)) or first[0]
    timers = Timers()
    for name, phase in (("schedule", "schedule"), ("postprocess", "bookkeeping")):
        timers.wrap(engine.scheduler, name, phase)
    for name, phase in (("layout", "layout"), ("upload", "upload/readback"), ("collect", "upload/readback"),
                        ("compute", "compute")):
        timers.wrap(engine.runner, name, phase)
    start = time.thread_time()
    for _ in range(steps):
        engine.step()
    wall = time.thread_time() - start
    engine.close()          # its objects collected now, not by a later measurement's collector pass
    per = {k: v / steps * 1e3 for k, v in timers.total.items()}
    host = wall / steps * 1e3 - per.get("compute", 0.0)
    named = sum(v for k, v in per.items() if k != "compute")
    per["other"] = host - named
    return dict(batch=batch, host_ms=host, compute_ms=per.pop("compute", 0.0), **per)


def end_to_end(rounds: int, num_prompts: int = 16, max_tokens: int = 32) -> None:
    """Tokens/s of the default model guiding itself, synchronous and asynchronous: both engines built
    first, then `rounds` alternating rounds (ABBA...), medians, so neither mode gets the warmer machine."""
    from padengine import Engine, SamplingParams
    from padengine.default_model import default_model_path
    path = default_model_path()
    prompts = [f"Give me {i + 2} tips for a good night's sleep." for i in range(num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, weight=1.0, ignore_eos=True)
    engines = {mode: Engine(path, path, async_scheduling=mode) for mode in (False, True)}
    rates, tokens = {mode: [] for mode in engines}, {}
    for engine in engines.values():
        engine.generate(prompts[:2], SamplingParams(max_tokens=4), preferences="Be concise.")     # warm up
    for r in range(rounds):
        for mode in ((False, True) if r % 2 == 0 else (True, False)):
            start = time.perf_counter()
            outs = engines[mode].generate(prompts, params, preferences="Be concise.")
            rates[mode].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
            tokens[mode] = [o.token_ids for o in outs]
    median = lambda xs: sorted(xs)[len(xs) // 2]
    for mode, xs in rates.items():
        print(f"default model, async {str(mode):5s}: {median(xs):.1f} tokens/s, median of {rounds} alternating "
              f"rounds ({num_prompts} prompts x {max_tokens} tokens; each: {', '.join(f'{x:.1f}' for x in xs)})",
              flush=True)
    print(f"identical outputs: {sum(a == b for a, b in zip(tokens[False], tokens[True]))}/{num_prompts}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tree", help="measure the padengine of this checkout instead")
    ap.add_argument("--async-scheduling", choices=["on", "off", "both"], default="both")
    ap.add_argument("--before", help="measure this checkout and that one, alternating, in subprocesses")
    ap.add_argument("--rounds", type=int, default=3,
                    help="with --before or --default-model: alternating rounds of both (medians reported)")
    ap.add_argument("--replay", action="store_true",
                    help="replay the first step's results instead of running the forward (warm host caches)")
    ap.add_argument("--default-model", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.before:
        compare(args)
        if args.default_model:
            end_to_end(args.rounds)
        return
    if args.tree:
        sys.path.insert(0, args.tree)
    import logging
    logging.disable(logging.WARNING)
    import torch
    torch.set_num_threads(1)
    import padengine
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.async_scheduling]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        base, reward = build_models(root)
        for batch in args.batches:
            for mode in modes:
                kwargs = {"async_scheduling": mode} if args.tree is None or mode else {}
                try:
                    row = measure(base, reward, batch, args.steps, args.replay, **kwargs)
                except TypeError:           # a checkout without async scheduling
                    if mode:
                        continue
                    row = measure(base, reward, batch, args.steps, args.replay)
                row["async"] = mode
                rows.append(row)
                split = "  ".join(f"{k} {row[k]:.3f}" for k in PHASES if k in row)
                print(f"batch {batch:4d} async {str(mode):5s} host {row['host_ms']:.3f} ms/step "
                      f"(compute {row['compute_ms']:.3f})  {split}", flush=True)
    print(f"padengine from {padengine.__file__}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.default_model:
        end_to_end(args.rounds)


PHASES = ("schedule", "layout", "upload/readback", "bookkeeping", "other")


def compare(args) -> None:
    """This checkout and `args.before`, each in its own process, alternating round by round (ABBA...), so
    that a noisy machine's drift falls on both; the median of each figure over the rounds."""
    trees = {"now": os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "before": args.before}
    runs: dict[str, list] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, os.path.abspath(__file__), "--tree", trees[name], "--steps",
                                str(args.steps), "--async-scheduling", args.async_scheduling, "--json", out.name,
                                *(["--replay"] if args.replay else []), "--batches", *map(str, args.batches)],
                               check=True, stdout=subprocess.DEVNULL)
                runs[name].append({(row["batch"], row["async"]): row for row in json.load(open(out.name))})
    median = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"host ms per decode step, median of {args.rounds} alternating rounds ({args.steps} steps each"
          f"{', forward replayed' if args.replay else ''})")
    print("| requests | loop | before | now | before / now | now by phase |")
    print("|---|---|---|---|---|---|")
    rows = []
    for key in runs["now"][0]:
        now = {k: median([run[key][k] for run in runs["now"]]) for k in ("host_ms", *PHASES)}
        before = median([run[key]["host_ms"] for run in runs["before"] if key in run] or [float("nan")])
        split = ", ".join(f"{k} {now[k]:.3f}" for k in PHASES)
        print(f"| {key[0]} | {'async' if key[1] else 'sync'} | {before:.3f} | {now['host_ms']:.3f} | "
              f"{before / now['host_ms']:.2f}x | {split} |", flush=True)
        rows.append(dict(batch=key[0], async_=key[1], before_ms=before, **now))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
