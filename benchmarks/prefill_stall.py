"""Decode stalls while a long prompt arrives: whole-prompt prefill against chunked prefill, side by side.

A few requests decode; after a few steps a long prompt (the P-Soups prompts joined) joins the batch.
Prefilled in one step, it holds every running request's next token for the whole prefill; chunked
(`max_num_batched_tokens` small), it advances a chunk per step beside the decodes. For each setting the
run reports the running requests' worst and median gap between tokens, the long request's time to first
token and the total time, and checks that both settings produce the same tokens (greedy).

    python benchmarks/prefill_stall.py                      # default model, a ~2000-token prompt, chunks of 256
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from padengine import Engine, SamplingParams  # noqa: E402
from padengine.default_model import default_model_path  # noqa: E402
from padengine.prompts import EVAL_PROMPTS  # noqa: E402



def run(engine: Engine, short: list[list[int]], long: list[int], max_tokens: int, join_after: int) -> dict:
    """Step by hand: the short requests first, the long one after `join_after` steps."""
    params = SamplingParams(max_tokens=max_tokens, weight=1.0, ignore_eos=True)
    running = engine.add_requests(prompt_token_ids=short, params=params)
    times, long_req, start = {r.request_id: [] for r in running}, None, time.perf_counter()
    steps = 0
    while any(not r.is_finished for r in running) or (long_req and not long_req.is_finished):
        if steps == join_after:
            long_req = engine.add_requests(prompt_token_ids=[long], params=params)[0]
        advanced = engine.step()
        now = time.perf_counter()
        for r in advanced:
            if r.request_id in times:
                times[r.request_id].append(now)
        steps += 1
    gaps = [b - a for t in times.values() for a, b in zip(t, t[1:])]
    return dict(max_gap_ms=max(gaps) * 1e3, median_gap_ms=statistics.median(gaps) * 1e3,
                long_ttft_ms=long_req.metrics.time_to_first_token * 1e3, total_s=time.perf_counter() - start,
                tokens=[r.output_ids for r in running] + [long_req.output_ids])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder, guiding itself (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=EVAL_PROMPTS, help="JSON list of {'prompt': ...}")
    p.add_argument("--running", type=int, default=4, help="requests decoding when the long prompt arrives")
    p.add_argument("--long-tokens", type=int, default=2000)
    p.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens of the chunked setting")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    path = args.model or default_model_path()
    texts = [x["prompt"] for x in json.load(open(args.prompts))]
    results = {}
    for name, budget in (("whole", max(8192, args.long_tokens + args.running * 2)), ("chunked", args.chunk)):
        engine = Engine(path, path, device=args.device, dtype=args.dtype, max_num_batched_tokens=budget)
        ids = [engine.tokenizer.encode(t) for t in texts]
        short = ids[:args.running]
        text = [t for x in ids[args.running:] for t in x]             # the other prompts, repeated
        long = (text * (args.long_tokens // len(text) + 1))[:args.long_tokens]
        run(engine, short, long[:64], 2, join_after=1)          # warm-up
        results[name] = run(engine, short, long, args.max_tokens, join_after=3)
        results[name]["max_num_batched_tokens"] = budget
    same = results["whole"].pop("tokens") == results["chunked"].pop("tokens")
    print(f"\n{args.running} requests decoding, a {args.long_tokens}-token prompt joins; {args.device} {args.dtype}")
    print("| prefill | max_num_batched_tokens | worst gap between tokens | median gap | long prompt TTFT | total |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['max_num_batched_tokens']} | {r['max_gap_ms']:.0f} ms | {r['median_gap_ms']:.0f} ms "
              f"| {r['long_ttft_ms']:.0f} ms | {r['total_s']:.1f} s |")
    print(f"identical tokens: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results, identical_tokens=same), f, indent=2)


if __name__ == "__main__":
    main()
