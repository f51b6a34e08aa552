"""Command line: `padengine demo` (also `python -m padengine demo`)."""
import argparse
import itertools
import logging
import sys
import textwrap

from padengine.errors import InvalidInput

DEMO_PROMPTS = ["What is the capital of France?",
                "Give me three tips for a good night's sleep.",
                "Why is the sky blue?"]
DEMO_PREFERENCE = "Be extremely concise: one short sentence."


def demo(args) -> None:
    """PAD on the default model guiding itself: base answers beside preference-guided answers."""
    from padengine import Engine, SamplingParams
    from padengine.default_model import default_model_path

    path = args.model or default_model_path()
    engine = Engine(path, args.reward or path, device=args.device, dtype=args.dtype)
    prompts = args.prompts or DEMO_PROMPTS
    base = engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, weight=0.0), use_tqdm=True)
    guided = engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, weight=args.weight,
                                                     top_k=args.top_k, preference_in_base=False),
                             preferences=args.preference, use_tqdm=True)
    width = 48
    print(f"\npreference: {args.preference!r}   (weight {args.weight}, top_k {args.top_k})\n")
    for prompt, b, g in zip(prompts, base, guided):
        print(f"## {prompt}")
        print(f"{'base':<{width}} | PAD-guided")
        left, right = textwrap.wrap(b.text, width) or [""], textwrap.wrap(g.text, width) or [""]
        for l, r in itertools.zip_longest(left, right, fillvalue=""):
            print(f"{l:<{width}} | {r}")
        print()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="padengine", description="Personalized alignment at decoding time.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="base vs PAD-guided answers on the default model")
    d.add_argument("prompts", nargs="*", help="prompts (default: three built-in ones)")
    d.add_argument("--preference", default=DEMO_PREFERENCE)
    d.add_argument("--weight", type=float, default=2.0)
    d.add_argument("--top-k", type=int, default=10)
    d.add_argument("--max-tokens", type=int, default=64)
    d.add_argument("--model", help="base model folder (default: SmolLM2-135M-Instruct)")
    d.add_argument("--reward", help="reward model folder (default: the base model guides itself)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="float32")
    d.set_defaults(func=demo)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (InvalidInput, RuntimeError) as e:
        print(f"padengine: error: {e}", file=sys.stderr)
        return 2
    return 0
