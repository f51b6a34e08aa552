"""Does PAD guidance move the default model's output toward a preference? A measured answer.

SmolLM2-135M-Instruct guides itself over the 50 P-Soups prompts, with preferences a program can check.
For each preference: adherence rate and mean length (words) for
  (a) bare     the bare prompt, no guidance (= PAD at weight 0);
  (b) prompt   the preference in the prompt, no guidance (w = 0, preference_in_base);
  (c) PAD w    the base sees the bare prompt, the reward stream the preference, at several weights;
  (d) pairs    two preferences at once (both in the prompt, or two PAD reward streams).
Greedy, and sampled (T = 0.7, several seeds) for bare / prompt / one PAD weight. (With the base also
seeing the preference, a model guiding itself has identical base and reward streams, so PAD adds
nothing: that setting is the prompt row.) Writes a Markdown table, a JSON file and PNG plots.

    python benchmarks/eval_preferences.py                      # the full run (docs/eval_*)
    python benchmarks/eval_preferences.py --limit 2 --max-tokens 8 --out-dir /tmp/eval   # a smoke run
"""
import argparse
import json
import logging
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from padengine import Engine, SamplingParams  # noqa: E402
from padengine.default_model import default_model_path  # noqa: E402

logger = logging.getLogger("eval_preferences")
SHARED_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "koala_eval_50.json")
FRENCH = set("le la les de des du et est un une en que qui pour dans sur pas au aux avec ce cette il elle nous "
             "vous je sont être ou mais par plus".split())
ENGLISH = set("the and is of to in that it for with on as are this you be by or but from an".split())


def words(text: str) -> list[str]:
    return re.findall(r"[\w'’-]+", text.lower())


CHECKS = {   # name: (preference text, adherence test)
    "lowercase": ("Write your entire answer in lowercase letters only, with no capital letters.",
                  lambda t: any(c.isalpha() for c in t) and t == t.lower()),
    "short": ("Answer in fewer than 40 words.", lambda t: 0 < len(words(t)) < 40),
    "bullets": ("Format your answer as a list of at least three bullet points.",
                lambda t: len(re.findall(r"^\s*(?:[-*•]|\d+[.)])\s+\S", t, re.M)) >= 3),
    "no_commas": ("Do not use any commas in your answer.", lambda t: bool(t.strip()) and "," not in t),
    "question": ("End your answer with a question to the reader.", lambda t: t.strip().endswith("?")),
    "french": ("Answer in French.",
               lambda t: sum(w in FRENCH for w in words(t)) > max(2, sum(w in ENGLISH for w in words(t)))),
}
PAIRS = [("lowercase", "short"), ("no_commas", "question")]


def conditions(args) -> list[dict]:
    """Every (setting, seed, condition) to run; each maps to one request per prompt."""
    settings = [("greedy", 0.0, [0])] + [("sampled", args.temperature, list(range(args.seeds)))] * (args.seeds > 0)
    out = []
    for setting, temp, seeds in settings:
        weights = args.weights if setting == "greedy" else [args.sampled_weight]
        for seed in seeds:
            base = dict(setting=setting, temperature=temp, seed=seed)
            out.append(dict(base, prefs=(), kind="bare", weight=0.0))
            for names in [(n,) for n in CHECKS] + (PAIRS if setting == "greedy" else []):
                out.append(dict(base, prefs=names, kind="prompt", weight=0.0))
                for w in (weights if len(names) == 1 else args.pair_weights):
                    out.append(dict(base, prefs=names, kind="pad", weight=w))
    return out


def request(cond: dict, max_tokens: int):
    names = cond["prefs"]
    params = SamplingParams(max_tokens=max_tokens, top_k=10, weight=cond["weight"], temperature=cond["temperature"],
                            seed=cond["seed"], preference_in_base=cond["kind"] == "prompt")
    if not names:
        return params, None
    if cond["kind"] == "prompt":
        return params, " ".join(CHECKS[n][0] for n in names)
    return params, [(CHECKS[n][0], cond["weight"]) for n in names]


def score(cond: dict, texts: list[str]) -> list[dict]:
    """One row per preference judged: the condition's own, or every single preference for `bare`."""
    judged = [(n,) for n in CHECKS] + PAIRS if cond["kind"] == "bare" else [cond["prefs"]]
    rows = []
    for names in judged:
        ok = [all(CHECKS[n][1](t) for n in names) for t in texts]
        rows.append(dict({k: v for k, v in cond.items() if k != "prefs"}, preference="+".join(names),
                         adherence=sum(ok) / len(ok), mean_words=sum(len(words(t)) for t in texts) / len(texts)))
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting]
        cols = list(dict.fromkeys(_col(r) for r in sub))
        lines += [f"\n### {setting}" + (f" (T = {sub[0]['temperature']}, mean over seeds)" if setting != "greedy" else ""),
                  "", "| preference | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for pref in dict.fromkeys(r["preference"] for r in sub):
            cells = []
            for col in cols:
                hits = [r for r in sub if r["preference"] == pref and _col(r) == col]
                cells.append(f"{_mean(hits, 'adherence'):.0%} ({_mean(hits, 'mean_words'):.0f}w)" if hits else "")
            lines.append(f"| {pref} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _col(r: dict) -> str:
    return {"bare": "bare", "prompt": "prompt"}.get(r["kind"], f"PAD w={r['weight']:g}")


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written")
        return
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        sub = [r for r in rows if r["setting"] == setting]
        for i, pref in enumerate(dict.fromkeys(r["preference"] for r in sub if r["kind"] == "pad")):
            pts = {0.0: _mean([r for r in sub if r["kind"] == "bare" and r["preference"] == pref], "adherence")}
            for w in sorted({r["weight"] for r in sub if r["kind"] == "pad" and r["preference"] == pref}):
                pts[w] = _mean([r for r in sub if r["kind"] == "pad" and r["preference"] == pref and r["weight"] == w],
                               "adherence")
            line, = ax.plot(list(pts), list(pts.values()), marker="o", label=pref, color=f"C{i}")
            prompt = [r for r in sub if r["kind"] == "prompt" and r["preference"] == pref]
            ax.axhline(_mean(prompt, "adherence"), color=line.get_color(), linestyle=":", linewidth=1)
        ax.set(title=f"{setting}: adherence vs PAD weight (dotted: preference in prompt)",
               xlabel="PAD weight (0 = bare prompt)", ylabel="adherence", ylim=(-0.03, 1.03))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default=SHARED_PROMPTS)
    p.add_argument("--limit", type=int, default=50, help="use the first N prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    p.add_argument("--pair-weights", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seeds", type=int, default=3, help="sampled runs (0 = greedy only)")
    p.add_argument("--sampled-weight", type=float, default=2.0)
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 runs about 2.5x faster than float32 on "
                   "CPUs with AVX512-BF16")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "docs"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    prompts = [x["prompt"] for x in json.load(open(args.prompts))][:args.limit]
    path = args.model or default_model_path()
    engine = Engine(path, path, dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    conds = conditions(args)
    reqs = [(c, q, *request(c, args.max_tokens)) for c in conds for q in prompts]
    t = time.perf_counter()
    outs = engine.generate([q for _, q, _, _ in reqs], [r[2] for r in reqs], preferences=[r[3] for r in reqs],
                           use_tqdm=True)
    elapsed = time.perf_counter() - t
    rows = []
    for i, cond in enumerate(conds):
        rows += score(cond, [o.text for o in outs[i * len(prompts):(i + 1) * len(prompts)]])
    os.makedirs(args.out_dir, exist_ok=True)
    tokens = sum(len(o.token_ids) for o in outs)
    header = (f"# Preference adherence: SmolLM2-135M-Instruct guiding itself\n\n{len(prompts)} P-Soups prompts, "
              f"max {args.max_tokens} new tokens, top_k 10, {args.dtype}; {len(reqs)} generations, {tokens} "
              f"tokens in {elapsed / 60:.1f} min. Cells: adherence (mean words).\n\n"
              f"`python benchmarks/eval_preferences.py {' '.join(sys.argv[1:])}`\n")
    md = header + table(rows)
    open(os.path.join(args.out_dir, "eval_preferences.md"), "w").write(md)
    samples = [dict(condition={k: v for k, v in c.items()}, prompt=q, text=o.text)
               for (c, q, _, _), o in zip(reqs, outs) if c["seed"] == 0][:: max(1, len(prompts) // 5)]
    json.dump(dict(args=vars(args), elapsed_s=elapsed, tokens=tokens, rows=rows, samples=samples),
              open(os.path.join(args.out_dir, "eval_preferences.json"), "w"), indent=1)
    plot(rows, os.path.join(args.out_dir, "eval_preferences.png"))
    print(md)


if __name__ == "__main__":
    main()
