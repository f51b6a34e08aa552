"""Does PAD move the default model's output toward a preference? A measured answer, with fluency beside it.

Over the 50 P-Soups prompts, with preferences a program can check (padengine/training/checkers.py), each
condition's adherence rate, mean length (words), repeated 4-gram rate and the base model's mean per-token
log-likelihood of the answer (given the prompt the base saw):
  bare       the bare prompt, no guidance (= PAD at weight 0);
  prompt     the preference in the prompt, no guidance (w = 0, preference_in_base);
  PAD w      the base sees the bare prompt, the reward model the preference, at several weights;
  PAD+ w     the authors' setting: base and reward model both see the preference (--both-weights);
  pairs      two preferences at once (both in the prompt, or two PAD reward streams).
The reward model is the base guiding itself (then PAD+ is the prompt row, so it is not run), or with
--persrm DIR a trained PersRM (padengine train), whose rows are split into held-in and held-out preferences
(checkers.SPLIT). Greedy, and sampled (T = 0.7, several seeds) for bare / prompt / one PAD weight. Writes
a Markdown table, a JSON file and PNG plots.

    python benchmarks/eval_preferences.py                      # self-guided (docs/eval_preferences.*)
    python benchmarks/eval_preferences.py --persrm ~/.cache/padengine/PersRM-SmolLM2-135M   # docs/eval_persrm.*
    python benchmarks/eval_preferences.py --limit 2 --max-tokens 8 --out-dir /tmp/eval   # a smoke run
"""
import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from padengine import Engine, SamplingParams  # noqa: E402
from padengine.default_model import default_model_path  # noqa: E402
from padengine.prompts import EVAL_PROMPTS  # noqa: E402
from padengine.training.checkers import get as checker, split_of, words  # noqa: E402

logger = logging.getLogger("eval_preferences")
SELF_GUIDED = ["lowercase", "short_40", "bullets_3", "no_commas", "question", "french"]
PERSRM = ["lowercase", "no_commas", "title", "short_15", "bullets_3",           # held in
          "short_40", "lowercase_plain", "question", "french"]                  # held out
PAIRS = [("lowercase", "short_40"), ("no_commas", "question")]


def repeated_4grams(text: str) -> float:
    """The share of an answer's word 4-grams that repeat an earlier one (degenerate loops score high)."""
    grams = list(zip(*(words(text)[i:] for i in range(4))))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def conditions(args) -> list[dict]:
    """Every (setting, seed, condition) to run; each maps to one request per prompt."""
    settings = [("greedy", 0.0, [0])] + [("sampled", args.temperature, list(range(args.seeds)))] * (args.seeds > 0)
    out = []
    for setting, temp, seeds in settings:
        greedy = setting == "greedy"
        for seed in seeds:
            base = dict(setting=setting, temperature=temp, seed=seed)
            out.append(dict(base, prefs=(), kind="bare", in_base=False, weight=0.0))
            for names in [(n,) for n in args.preferences] + (args.pairs if greedy else []):
                out.append(dict(base, prefs=names, kind="prompt", in_base=True, weight=0.0))
                single = len(names) == 1
                pad = [(False, w) for w in (args.weights if greedy else [args.sampled_weight])] if single else \
                    [(False, w) for w in args.pair_weights]
                pad += [(True, w) for w in args.both_weights] if single and greedy else []
                out += [dict(base, prefs=names, kind="pad", in_base=b, weight=w) for b, w in pad]
    return out


def request(cond: dict, max_tokens: int):
    names = cond["prefs"]
    params = SamplingParams(max_tokens=max_tokens, top_k=10, weight=cond["weight"], temperature=cond["temperature"],
                            seed=cond["seed"], preference_in_base=cond["in_base"], base_logprobs=True)
    texts = [checker(n).text for n in names]
    if not names:
        return params, None
    return params, " ".join(texts) if cond["kind"] == "prompt" else [(t, cond["weight"]) for t in texts]


def score(cond: dict, outs, preferences, pairs) -> list[dict]:
    """One row per preference judged: the condition's own, or every single preference (and pair) for `bare`."""
    judged = [(n,) for n in preferences] + pairs if cond["kind"] == "bare" else [cond["prefs"]]
    texts = [o.text for o in outs]
    fluency = dict(mean_words=_avg(len(words(t)) for t in texts), repeated_4grams=_avg(map(repeated_4grams, texts)),
                   base_loglik=_avg(_avg(o.base_logprobs) for o in outs if o.base_logprobs))
    rows = []
    for names in judged:
        ok = [all(checker(n).check(t) for n in names) for t in texts]
        rows.append(dict({k: v for k, v in cond.items() if k != "prefs"}, preference="+".join(names),
                         split=split_of(names[0]) if len(names) == 1 else "pair", adherence=_avg(ok), **fluency))
    return rows


def _avg(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _col(r: dict) -> str:
    return {"bare": "bare", "prompt": "prompt"}.get(r["kind"], f"PAD{'+' * r['in_base']} w={r['weight']:g}")


def _mean(rows, key):
    return _avg(r[key] for r in rows)


def table(rows: list[dict]) -> str:
    """Per setting: adherence (mean words) per preference and condition; then the fluency of each condition."""
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting]
        cols = list(dict.fromkeys(_col(r) for r in sub))
        lines += [f"\n### {setting}" + (f" (T = {sub[0]['temperature']}, mean over seeds)" if setting != "greedy" else ""),
                  "", "| preference | split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for pref in dict.fromkeys(r["preference"] for r in sub):
            cells = []
            for col in cols:
                hits = [r for r in sub if r["preference"] == pref and _col(r) == col]
                cells.append(f"{_mean(hits, 'adherence'):.0%} ({_mean(hits, 'mean_words'):.0f}w)" if hits else "")
            split = next(r["split"] for r in sub if r["preference"] == pref)
            lines.append(f"| {pref} | {split} | " + " | ".join(cells) + " |")
        fl = [r for r in sub if r["kind"] != "bare" or r["preference"] == sub[0]["preference"]]
        lines += ["", "Fluency (mean over that column's rows): repeated 4-grams / base mean log-likelihood per token", "",
                  "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                  "| repeated 4-grams | " + " | ".join(f"{_mean([r for r in fl if _col(r) == c], 'repeated_4grams'):.3f}"
                                                      for c in cols) + " |",
                  "| base log-lik | " + " | ".join(f"{_mean([r for r in fl if _col(r) == c], 'base_loglik'):.3f}"
                                                  for c in cols) + " |"]
    return "\n".join(lines) + "\n"


def targets(rows: list[dict]) -> dict:
    """Held-in / held-out gains of PAD+ (the trained PersRM, authors' setting) over preference-in-prompt, at the
    single weight best on average over each group, and fluency ratios at that weight."""
    greedy = [r for r in rows if r["setting"] == "greedy" and r["kind"] != "bare" and r["split"] != "pair"]
    out = {}
    for group, prefix in (("held_in", "train"), ("held_out", "held_out")):
        sub = [r for r in greedy if r["split"].startswith(prefix)]
        prompt = [r for r in sub if r["kind"] == "prompt"]
        weights = sorted({r["weight"] for r in sub if r["kind"] == "pad" and r["in_base"]})
        if not prompt or not weights:
            continue
        pad = {w: [r for r in sub if r["kind"] == "pad" and r["in_base"] and r["weight"] == w] for w in weights}
        best = max(weights, key=lambda w: _mean(pad[w], "adherence"))
        out[group] = dict(preferences=[r["preference"] for r in prompt], best_weight=best,
                          prompt_adherence=_mean(prompt, "adherence"), pad_adherence=_mean(pad[best], "adherence"),
                          gain_points=100 * (_mean(pad[best], "adherence") - _mean(prompt, "adherence")),
                          repeated_4grams_ratio=_mean(pad[best], "repeated_4grams") /
                          max(_mean(prompt, "repeated_4grams"), 1e-9),
                          neg_loglik_ratio=_mean(pad[best], "base_loglik") / min(_mean(prompt, "base_loglik"), -1e-9),
                          per_preference_best={r["preference"]: max(
                              (x["adherence"], x["weight"]) for w in weights for x in pad[w]
                              if x["preference"] == r["preference"]) for r in prompt})
    return out


def target_table(result: dict) -> str:
    lines = ["\n### Targets (greedy): PAD+ at the one weight best over the group vs preference-in-prompt\n",
             "| group | preferences | best w | prompt | PAD+ | gain | needed | repeated 4-grams (x prompt) | "
             "-log-lik (x prompt) |", "|---" * 9 + "|"]
    for group, t in result.items():
        need = 20 if group == "held_in" else 10
        lines.append(f"| {group} | {', '.join(t['preferences'])} | {t['best_weight']:g} | {t['prompt_adherence']:.0%} | "
                     f"{t['pad_adherence']:.0%} | {t['gain_points']:+.0f} | +{need} | {t['repeated_4grams_ratio']:.2f} | "
                     f"{t['neg_loglik_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written")
        return
    panels = [(s, b) for s in dict.fromkeys(r["setting"] for r in rows)
              for b in (False, True) if any(r["setting"] == s and r["kind"] == "pad" and r["in_base"] == b for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (setting, in_base) in zip(axes[0], panels):
        sub = [r for r in rows if r["setting"] == setting]
        pads = [r for r in sub if r["kind"] == "pad" and r["in_base"] == in_base]
        for i, pref in enumerate(dict.fromkeys(r["preference"] for r in pads)):
            start = [r for r in sub if r["preference"] == pref and r["kind"] == ("prompt" if in_base else "bare")]
            pts = {0.0: _mean(start, "adherence")}
            for w in sorted({r["weight"] for r in pads if r["preference"] == pref}):
                pts[w] = _mean([r for r in pads if r["preference"] == pref and r["weight"] == w], "adherence")
            split = next(r["split"] for r in sub if r["preference"] == pref)
            held = " (held out)" if split.startswith("held_out") else ""
            line, = ax.plot(list(pts), list(pts.values()), marker="o", label=pref + held, color=f"C{i % 10}",
                            linestyle="--" if held else "-")
            prompt = [r for r in sub if r["kind"] == "prompt" and r["preference"] == pref]
            ax.axhline(_mean(prompt, "adherence"), color=line.get_color(), linestyle=":", linewidth=1)
        title = "PAD+ (base also sees the preference)" if in_base else "PAD (base sees the bare prompt)"
        ax.set(title=f"{setting}: {title}; dotted: preference in prompt",
               xlabel="PAD weight (0: " + ("prompt" if in_base else "bare prompt") + ")", ylabel="adherence",
               ylim=(-0.03, 1.03))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", default=EVAL_PROMPTS)
    p.add_argument("--limit", type=int, default=50, help="use the first N prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--persrm", help="a trained PersRM folder as the reward model (default: the base guides itself)")
    p.add_argument("--preferences", nargs="+", help="checker names (default: six, or nine split into held-in and "
                   "held-out with --persrm)")
    p.add_argument("--weights", type=float, nargs="+", help="PAD weights, base sees the bare prompt (default "
                   "0.5 1 2 3; 2 4 with --persrm)")
    p.add_argument("--both-weights", type=float, nargs="*", help="PAD+ weights, base also sees the preference "
                   "(default: none; 1 2 4 with --persrm)")
    p.add_argument("--pair-weights", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seeds", type=int, help="sampled runs (0 = greedy only; default 3, 0 with --persrm)")
    p.add_argument("--sampled-weight", type=float, default=2.0)
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", help="float32 is the fast dtype on CPUs without AVX512-BF16")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "docs"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trained = args.persrm is not None
    args.preferences = args.preferences or (PERSRM if trained else SELF_GUIDED)
    for name in args.preferences:
        checker(name, "--preferences")
    args.weights = args.weights or ([2.0, 4.0] if trained else [0.5, 1.0, 2.0, 3.0])
    args.both_weights = args.both_weights if args.both_weights is not None else ([1.0, 2.0, 4.0] if trained else [])
    args.seeds = args.seeds if args.seeds is not None else (0 if trained else 3)
    args.pairs = [] if trained else [pair for pair in PAIRS if set(pair) <= set(args.preferences)]

    prompts = [x["prompt"] for x in json.load(open(args.prompts))][:args.limit]
    path = args.model or default_model_path()
    engine = Engine(path, args.persrm or path, dtype=args.dtype, max_num_seqs=args.max_num_seqs)
    conds = conditions(args)
    reqs = [(c, q, *request(c, args.max_tokens)) for c in conds for q in prompts]
    t = time.perf_counter()
    outs = engine.generate([q for _, q, _, _ in reqs], [r[2] for r in reqs], preferences=[r[3] for r in reqs],
                           use_tqdm=True)
    elapsed = time.perf_counter() - t
    rows = []
    for i, cond in enumerate(conds):
        rows += score(cond, outs[i * len(prompts):(i + 1) * len(prompts)], args.preferences, args.pairs)
    os.makedirs(args.out_dir, exist_ok=True)
    name = "eval_persrm" if trained else "eval_preferences"
    tokens = sum(len(o.token_ids) for o in outs)
    guide = f"guided by the PersRM `{os.path.basename(os.path.normpath(args.persrm))}`" if trained else "guiding itself"
    header = (f"# Preference adherence: SmolLM2-135M-Instruct {guide}\n\n{len(prompts)} P-Soups prompts, max "
              f"{args.max_tokens} new tokens, top_k 10, {args.dtype}; {len(reqs)} generations, {tokens} tokens in "
              f"{elapsed / 60:.1f} min. Cells: adherence (mean words). Base log-likelihood: given the prompt the base "
              f"saw.\n\n`python benchmarks/eval_preferences.py {' '.join(sys.argv[1:])}`\n")
    result = targets(rows) if trained else {}
    md = header + table(rows) + (target_table(result) if trained else "")
    open(os.path.join(args.out_dir, f"{name}.md"), "w").write(md)
    samples = [dict(condition=dict(c), prompt=q, text=o.text)
               for (c, q, _, _), o in zip(reqs, outs) if c["seed"] == 0][:: max(1, len(prompts) // 5)]
    json.dump(dict(args=vars(args), elapsed_s=elapsed, tokens=tokens, rows=rows, targets=result, samples=samples),
              open(os.path.join(args.out_dir, f"{name}.json"), "w"), indent=1)
    plot(rows, os.path.join(args.out_dir, f"{name}.png"))
    print(md)


if __name__ == "__main__":
    main()
