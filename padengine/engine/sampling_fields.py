"""The sampler's per-request inputs of a step laid out by the general path: parameters and penalties.

`sampling_fields` gathers each request's sampling parameters into named per-row fields (top_k, seed,
temperature, reward owners and weights, top_p / min_p when a row filters) and the step-wide sampler
settings (candidate width, alternatives, base log-probabilities); engine/decode_batch.py keeps the same
fields of a decode step across steps. `penalty_fields` adds what the device needs to count occurrences
for penalized rows.
"""
from dataclasses import dataclass

from padengine.engine.sequence import PENDING, Request


@dataclass
class SamplingFields:
    """The sampler's per-request fields of a batch and its step-wide settings."""
    values: list[tuple[str, list, bool]]      # (name, values, floating)
    max_k: int
    num_top: int
    base_logprobs: bool
    penalized: bool


# what a padding row (a CUDA graph's spare rows) holds in each per-row sampler field: greedy, no filter
ROW_PADDING = {"top_k": 1, "seed": 0, "temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "position": 0}


def sampling_fields(reqs: list[Request], owners: list[tuple], rows: int, num_rewards: int,
                     vocab: int) -> SamplingFields:
    pad = rows - len(reqs)
    p = [r.params for r in reqs]
    padded = lambda name, values: values + [ROW_PADDING[name]] * pad
    values = [("top_k", padded("top_k", [x.top_k for x in p]), False),
              ("seed", padded("seed", [r.seed for r in reqs]), False),
              ("temperature", padded("temperature", [x.temperature for x in p]), True)]
    if num_rewards:
        values += [("owner", [i for i, _, _ in owners] + [rows] * (num_rewards - len(owners)), False),
                   ("weights", [w for _, _, w in owners] + [0.0] * (num_rewards - len(owners)), True)]
    if any(x.filters for x in p):
        values += [("top_p", padded("top_p", [x.top_p for x in p]), True),
                   ("min_p", padded("min_p", [x.min_p for x in p]), True)]
    return SamplingFields(values, max((x.num_candidates(vocab) for x in p), default=1),
                          max((x.top_logprobs for x in p), default=0), any(x.base_logprobs for x in p),
                          any(x.penalized for x in p))


def penalty_fields(fields, reqs: list[Request], rows: int, feed: bool) -> None:
    """Per row (plus one neutral row, the owner of padding reward streams) the three penalties, and as
    (row, token) pairs the generated tokens of penalized rows (PENDING ones fed on the device) and the
    prompt tokens of those with a repetition penalty, from which the device counts occurrences."""
    neutral = rows + 1 - len(reqs)
    fields.add("repetition", [r.params.repetition_penalty for r in reqs] + [1.0] * neutral, floating=True)
    fields.add("presence", [r.params.presence_penalty for r in reqs] + [0.0] * neutral, floating=True)
    fields.add("frequency", [r.params.frequency_penalty for r in reqs] + [0.0] * neutral, floating=True)
    out_rows, out_tokens, prompt_rows, prompt_tokens = [], [], [], []
    for i, r in enumerate(reqs):
        if r.params.penalized:
            generated = r.base.token_ids[r.base.num_prompt_tokens:]
            out_rows += [i] * len(generated)
            out_tokens += generated
        if r.params.repetition_penalty != 1.0:
            prompt = r.base.token_ids[:r.base.num_prompt_tokens]
            prompt_rows += [i] * len(prompt)
            prompt_tokens += prompt
    fields.add("generated_rows", out_rows)
    fields.add("generated_tokens", out_tokens)
    if feed:
        fields.add("generated_feed", [reqs[i].pending_row if t == PENDING else -1 for i, t in zip(out_rows, out_tokens)])
    fields.add("prompt_rows", prompt_rows)
    fields.add("prompt_tokens", prompt_tokens)
