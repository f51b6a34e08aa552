"""Throughput: the engine against the transformers PAD loop (benchmarks/baselines/hf_pad.py), side by side.

Same models, the same P-Soups prompts, the same number of tokens (ignore_eos), greedy; the baseline runs
one request at a time (as the authors do) and as one left-padded batch (`HFPad.generate_batch`). The run
also reports whether they produced the engine's tokens. Example (the README's figures):

    python benchmarks/throughput.py --num-prompts 16 --max-tokens 64
"""
import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.baselines.hf_pad import HFPad  # noqa: E402
from padengine import Engine, SamplingParams  # noqa: E402
from padengine.default_model import default_model_path  # noqa: E402
from padengine.prompts import EVAL_PROMPTS, encode, user_message  # noqa: E402

PREFERENCE = "Be extremely concise: one short sentence."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--reward", help="reward model folder (default: the base model)")
    p.add_argument("--prompts", default=EVAL_PROMPTS, help="JSON list of {'prompt': ...}")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    base_path = args.model or default_model_path()
    reward_path = args.reward or base_path
    prompts = [x["prompt"] for x in json.load(open(args.prompts))][:args.num_prompts]
    engine = Engine(base_path, reward_path, device=args.device, dtype=args.dtype, kernels=args.kernels)
    base_ids = [encode(engine.tokenizer, user_message(q, None)) for q in prompts]
    reward_ids = [encode(engine.reward_tokenizer, user_message(q, PREFERENCE)) for q in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, top_k=args.top_k, weight=args.weight, ignore_eos=True)
    total = len(prompts) * args.max_tokens

    engine.generate(prompt_token_ids=base_ids[:2], reward_prompt_token_ids=reward_ids[:2],
                    params=SamplingParams(max_tokens=4, ignore_eos=True))              # warm-up
    t = time.perf_counter()
    outs = engine.generate(prompt_token_ids=base_ids, reward_prompt_token_ids=reward_ids, params=params,
                           use_tqdm=True)
    engine_s = time.perf_counter() - t
    result = {"prompts": len(prompts), "max_tokens": args.max_tokens, "device": args.device,
              "dtype": args.dtype, "kernels": engine.config.kernels, "threads": torch.get_num_threads(),
              "engine_tokens_per_s": total / engine_s, "engine_s": engine_s}
    if not args.skip_baseline:
        ref = HFPad.load(base_path, reward_path, dtype=engine.config.torch_dtype, device=args.device)
        ref.generate(base_ids[0], [(reward_ids[0], args.weight)], 4, args.top_k)              # warm-up
        t = time.perf_counter()
        ref_out = [ref.generate(b, [(r, args.weight)], args.max_tokens, args.top_k)
                   for b, r in tqdm(list(zip(base_ids, reward_ids)), desc="transformers PAD")]
        base_s = time.perf_counter() - t
        result.update(baseline_tokens_per_s=total / base_s, baseline_s=base_s, speedup=base_s / engine_s,
                      identical_outputs=sum(o.token_ids == r for o, r in zip(outs, ref_out)))
        t = time.perf_counter()
        batch_out = ref.generate_batch(base_ids, [reward_ids], [args.weight], args.max_tokens, args.top_k)
        batch_s = time.perf_counter() - t
        result.update(batched_tokens_per_s=total / batch_s, batched_s=batch_s, batched_speedup=batch_s / engine_s,
                      batched_identical_outputs=sum(o.token_ids == r for o, r in zip(outs, batch_out)))
    print(f"\n{len(prompts)} prompts x {args.max_tokens} tokens, {args.device} {args.dtype}, "
          f"kernels={engine.config.kernels}, {result['threads']} threads")
    print(f"engine                 {result['engine_tokens_per_s']:8.1f} tokens/s")
    if not args.skip_baseline:
        print(f"transformers PAD loop  {result['baseline_tokens_per_s']:8.1f} tokens/s")
        print(f"speedup                {result['speedup']:8.2f}x   "
              f"(identical outputs: {result['identical_outputs']}/{len(prompts)})")
        print(f"batched PAD loop       {result['batched_tokens_per_s']:8.1f} tokens/s")
        print(f"speedup                {result['batched_speedup']:8.2f}x   "
              f"(identical outputs: {result['batched_identical_outputs']}/{len(prompts)})")
    if args.json:
        json.dump(result, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
