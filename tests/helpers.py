"""Shared test helpers: random request batches and the transformers reference run over them."""
import random

from benchmarks.baselines.hf_pad import HFPad
from padengine import SamplingParams

EOS = {1}


def random_batch(vocab: int, n: int = 18, seed: int = 0, shared_prefix: int = 0):
    """Token-id prompts of mixed lengths; reward prompts differ from base prompts (a preference-like
    preamble); weights cycle over {0, 0.5, 1.5} and top_k over {1, 10, 0}."""
    rng = random.Random(seed)
    prefix = [rng.randrange(4, vocab) for _ in range(shared_prefix)]
    preamble = [rng.randrange(4, vocab) for _ in range(9)]
    base, reward, params = [], [], []
    for i in range(n):
        prompt = prefix + [rng.randrange(4, vocab) for _ in range(rng.randrange(1, 40))]
        base.append(prompt)
        reward.append(preamble + prompt if i % 3 else prompt)
        params.append(SamplingParams(max_tokens=rng.randrange(4, 20), top_k=(1, 10, 0)[i % 3],
                                     weight=(0.0, 0.5, 1.5)[(i // 3) % 3], ignore_eos=bool(i % 2)))
    return base, reward, params


_REFERENCE_RUNS: dict = {}


def reference(base_path, reward_path, base, reward, params):
    """`reward` entries: token ids (weighted by params.weight) or a list of (token ids, weight) pairs.
    Remembered for the session: tests run on several kernel sets compare against one transformers run."""
    key = repr((base_path, reward_path, base, reward,
                [(p.weight, p.max_tokens, p.top_k, p.ignore_eos) for p in params]))
    if key not in _REFERENCE_RUNS:
        ref = HFPad.load(base_path, reward_path)
        pairs = lambda r, p: r if isinstance(r[0], tuple) else [(r, p.weight)]
        _REFERENCE_RUNS[key] = [ref.generate(b, pairs(r, p), p.max_tokens, p.top_k, set() if p.ignore_eos else EOS)
                                for b, r, p in zip(base, reward, params)]
    return [list(tokens) for tokens in _REFERENCE_RUNS[key]]


def add_stop_tokens(params, expected, every: int = 4):
    """Give every `every`-th request a stop token taken from the middle of its reference output, and
    return the expectations cut after the first occurrence (greedy output before a stop is unchanged)."""
    cut = []
    for i, (p, out) in enumerate(zip(params, expected)):
        if i % every == 1 and len(out) > 2:
            stop = out[len(out) // 2]
            p.stop_token_ids = [stop]
            out = out[:out.index(stop) + 1]
        cut.append(out)
    return cut


def fail_launch(engine, monkeypatch, nth: int):
    """Make the engine's nth step launch raise (a device lost); returns the real launch, to restore."""
    launch, calls = engine.runner.launch, []

    def failing(batch):
        calls.append(1)
        if len(calls) == nth:
            raise RuntimeError("device lost")
        return launch(batch)

    monkeypatch.setattr(engine.runner, "launch", failing)
    return launch


def interleave(engine, plan) -> dict:
    """Run `plan`'s requests: each (joins, base, reward, params, abort_at) joins at the start (None) or
    once the first request has `joins` tokens, and is aborted once it has `abort_at` tokens. These
    events depend on tokens, not steps, so both loops see the same ones. Returns each plan entry's request."""
    reqs, joined = [], set()
    for _ in range(1000):
        for i, (joins, base, reward, params, _) in enumerate(plan):
            first = reqs[0][1] if reqs else None
            if i not in joined and (joins is None or first is not None and (
                    len(first.output_ids) >= joins or first.is_finished)):
                reqs.append((i, engine.add_requests(prompt_token_ids=[base], reward_prompt_token_ids=[reward],
                                                    params=params)[0]))
                joined.add(i)
        for i, req in reqs:
            if plan[i][4] is not None and len(req.output_ids) >= plan[i][4]:
                engine.abort(req)
        if len(reqs) == len(plan) and not engine.has_work():
            break
        engine.step()
    assert len(reqs) == len(plan) and all(p.num_used == 0 for p in engine.scheduler.pools)
    return dict(reqs)


def joining_plan(tokenizer, sampled: bool):
    """Nine requests that join so that the batch grows 1 -> 3 -> 9 mid-run: each growth is the first step
    of a new graph bucket (1, 4, 16 rows), taken while the step before is still in flight."""
    base, reward, params = random_batch(len(tokenizer), n=9, seed=41)
    for i, p in enumerate(params):
        p.max_tokens, p.ignore_eos = 14, True
        if sampled:
            p.temperature, p.seed = 0.8, i
    joins = [None, 2, 2, 5, 5, 5, 5, 5, 5]
    return [(j, b, r, p, None) for j, b, r, p in zip(joins, base, reward, params)], (base, reward, params)
