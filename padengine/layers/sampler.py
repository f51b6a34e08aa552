"""The PAD sampler: choose each request's next token from base and reward logits.

    score(c) = z_b[c] + w * (log_softmax_C(z_r)[c] - log_softmax_C(z_b)[c])   for c in C = top-k of z_b

Temperature 0 takes the highest score; T > 0 draws from softmax(score / T) by the Gumbel-max trick with
noise hashed from (seed, position, token id), so a draw depends only on the request's own seed and the
position of the token, never on the rest of the batch, and replays identically after preemption.
`pad_sample` is the torch implementation; the fused Triton kernel has the same signature and noise.
"""
from typing import NamedTuple

import torch

MASK32 = 0xFFFFFFFF
MAX_FUSED_TOP_K = 256   # the largest top-k the fused Triton sampler handles itself (and a CUDA graph holds)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding unsigned 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: torch.Tensor, position: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [N, K] for token_ids [N, K], keyed by per-row seed and position [N]."""
    key = _mix32((seed.long() & MASK32) ^ _mix32((seed.long() >> 32) & MASK32))
    key = _mix32((key + position.long()) & MASK32)
    return gumbel_from_hash(_mix32((key[:, None] ^ token_ids.long()) & MASK32))


def gumbel_from_hash(h: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from 32-bit hashes: u in [2^-24, 1 - 2^-24] (23 bits, both ends exact in float32, so
    the noise is always finite), then -log(-log(u))."""
    u = ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


def num_candidates(top_k: torch.Tensor, vocab: int) -> torch.Tensor:
    """Per row, the base candidates scored: top_k, or the whole vocabulary for 0 or past it (as
    `SamplingParams.num_candidates` on the host)."""
    return torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)


def candidates(base_logits, top_k, max_k=None):
    """Candidate ids [N, K] (base top-k, K = max_k or else the largest k of the batch), their base logits
    (-inf past a row's own k) and that mask `invalid`."""
    vocab = base_logits.shape[-1]
    k = num_candidates(top_k, vocab)
    kmax = min(max_k, vocab) if max_k is not None else int(k.max())    # int(): a host sync
    zb, cand = base_logits.float().topk(kmax, dim=-1)
    invalid = torch.arange(kmax, device=zb.device)[None, :] >= k[:, None]
    return cand, zb.masked_fill(invalid, float("-inf")), invalid


def candidate_scores(zb, zr, weight, invalid):
    """PAD scores of the candidates from their base and reward logits [N, K] (-inf where `invalid`)."""
    zr = zr.float().masked_fill(invalid, float("-inf"))
    shift = torch.log_softmax(zr, dim=-1) - torch.log_softmax(zb, dim=-1)
    score = zb + weight.float()[:, None] * shift.masked_fill(invalid, 0.0)
    return score.masked_fill(invalid, float("-inf"))


def pad_scores(base_logits, reward_logits, top_k, weight, max_k=None):
    """Candidate ids [N, K] and their PAD scores (-inf past a row's own k)."""
    cand, zb, invalid = candidates(base_logits, top_k, max_k)
    if reward_logits is None:
        return cand, zb
    return cand, candidate_scores(zb, reward_logits.gather(1, cand), weight, invalid)


class Sample(NamedTuple):
    tokens: torch.Tensor           # [N] int64
    logprobs: torch.Tensor         # [N] float32: the choice under the distribution it was drawn from
    top_ids: torch.Tensor          # [N, num_top] int64: the most likely candidates of that distribution
    top_logprobs: torch.Tensor     # [N, num_top] float32; -inf where fewer candidates survive


def filter_scores(scaled, top_p, min_p):
    """Remove candidates from softmax(scaled) [N, K] (-inf off the candidates): min_p drops those below
    min_p times the most likely one's probability; top_p keeps the most likely ones whose probability
    mass before them is below top_p, ties at the cut kept. Both look at the unfiltered distribution, so
    their order does not matter; top_p = 1 and min_p = 0 remove nothing."""
    logp = torch.log_softmax(scaled, dim=-1)
    drop = torch.zeros_like(scaled, dtype=torch.bool)
    if min_p is not None:
        drop |= logp < (logp.max(-1).values + torch.log(min_p.float()))[:, None]
    if top_p is not None:
        ranked = logp.sort(-1, descending=True).values
        mass_before = ranked.exp().cumsum(-1) - ranked.exp()
        cut = torch.where(mass_before < top_p.float()[:, None], ranked, float("inf")).min(-1).values
        drop |= (logp < cut[:, None]) & (top_p < 1)[:, None]
    return scaled.masked_fill(drop, float("-inf"))


def pad_sample(base_logits, reward_logits, top_k, weight, temperature, seed, position, top_p=None, min_p=None,
               max_k=None, num_top=0) -> Sample:
    """Pick one token per row. Every argument after reward_logits is a per-row tensor [N].
    reward_logits may be None (plain top-k decoding) and may be wider than the base vocabulary.
    top_p and min_p (None: no filter) narrow softmax(score / T) before the draw. `max_k` (a host int, at
    least every row's effective k) spares a host sync, as in a CUDA graph. `num_top` alternatives per
    row come back with their log-probabilities. Log-probabilities are those of the filtered
    softmax(score / T), at T = 1 for greedy rows."""
    cand, score = pad_scores(base_logits, reward_logits, top_k, weight, max_k)
    return choose(cand, score, temperature, seed, position, top_p, min_p, num_top)


def choose(cand, score, temperature, seed, position, top_p=None, min_p=None, num_top=0) -> Sample:
    """`pad_sample` from the candidates [N, K] and their PAD scores on: temperature, filters, the pick."""
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]
    scaled = score / temp
    if top_p is not None or min_p is not None:
        scaled = filter_scores(scaled, top_p, min_p)
    noisy = (scaled + gumbel_noise(seed, position, cand)).masked_fill(scaled == float("-inf"), float("-inf"))
    pick = torch.where(greedy, scaled.argmax(-1), noisy.argmax(-1))
    logp = torch.log_softmax(scaled, dim=-1)
    top_lp, top_at = logp.topk(min(num_top, logp.shape[1]), dim=-1)
    return Sample(cand.gather(1, pick[:, None]).squeeze(1), logp.gather(1, pick[:, None]).squeeze(1),
                  cand.gather(1, top_at), top_lp)


def apply_penalties(logits, counts, seen, repetition, presence, frequency):
    """vLLM's penalties on logits [N, >= V] (the first V columns, the base vocabulary): `counts` [N, V]
    how often each token was generated, `seen` [N, V] whether it is in the prompt or was generated.
    Repetition divides a positive logit (multiplies a negative one) of every seen token; presence
    subtracts once per generated token, frequency once per occurrence. Returns a new float32 tensor."""
    out = logits.float().clone()
    vocab = counts.shape[1]
    z = out[:, :vocab]
    rep = repetition.float()[:, None]
    z.copy_(torch.where(seen, torch.where(z > 0, z / rep, z * rep), z))
    z -= frequency.float()[:, None] * counts + presence.float()[:, None] * (counts > 0)
    return out


def penalizer(p, generated: torch.Tensor, rows: int, vocab: int, cols: slice):
    """`penalize(logits, owners)`: the step's penalties (`p`, executor/step.py's `Penalties`) on logits whose
    rows belong to sampler rows `owners` (a slice or an index tensor; `rows` is the neutral row of padding
    streams). Occurrence counts are built on the device from the uploaded (row, token) pairs, `generated`
    being the tokens with the pending ones read; `cols` are the ids the logits hold (a rank's vocabulary
    slice)."""
    counts = torch.zeros(rows + 1, vocab, device=p.repetition.device)
    ones = torch.ones(p.generated_rows.shape[0], device=counts.device)
    counts.index_put_((p.generated_rows, generated), ones, accumulate=True)
    seen = counts > 0
    seen[p.prompt_rows, p.prompt_tokens] = True
    counts, seen = counts[:, cols], seen[:, cols]
    return lambda logits, owners: apply_penalties(logits, counts[owners], seen[owners], p.repetition[owners],
                                                  p.presence[owners], p.frequency[owners])


def merge_rewards(base_logits, reward_rows, owner, weights):
    """Fold several reward streams per row into the one reward row and weight that `pad_sample` takes.

    reward_rows [R, V_r] belong to rows `owner` [R] with PAD weights `weights` [R]; owner N (one past
    the last row) marks a padding stream, which is dropped. A row with one stream passes through
    unchanged (reward row as is, its weight). For J > 1 streams,
        sum_j w_j (log_softmax_C(z_j) - log_softmax_C(z_b))  and  log_softmax_C(z') - log_softmax_C(z_b)
    with z' = (1 - sum_j w_j) z_b + sum_j w_j z_j differ only by a per-row constant, which neither the
    argmax nor softmax(score / T) sees: such rows get reward z' and weight 1. Rows with no stream: weight 0.
    No step waits on the host, so a CUDA graph can hold it.
    """
    n, vocab = base_logits.shape
    per_row = lambda values: values.new_zeros(n + 1, *values.shape[1:]).index_add_(0, owner, values)
    multi = per_row(torch.ones_like(weights)) > 1
    multi_owner = multi[owner]
    rows = reward_rows.float()
    merged = per_row(rows * torch.where(multi_owner, weights, 1.0)[:, None])[:n]
    single = per_row(torch.where(multi_owner, 0.0, weights))[:n]
    base_share = (1 - per_row(weights))[:n, None] * base_logits.float()
    merged[:, :vocab] += torch.where(multi[:n, None], base_share, 0.0)    # + 0: one-stream rows stay exact
    return merged, torch.where(multi[:n], 1.0, single)
