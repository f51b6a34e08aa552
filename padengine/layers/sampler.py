"""The PAD sampler: choose each request's next token from base and reward logits.

    score(c) = z_b[c] + w * (log_softmax_C(z_r)[c] - log_softmax_C(z_b)[c])   for c in C = top-k of z_b

Temperature 0 takes the highest score; T > 0 draws from softmax(score / T) by the Gumbel-max trick with
noise hashed from (seed, position, token id), so a draw depends only on the request's own seed and the
position of the token, never on the rest of the batch, and replays identically after preemption.
`pad_sample` is the torch implementation; the fused Triton kernel has the same signature and noise.
"""
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


def pad_scores(base_logits, reward_logits, top_k, weight, max_k=None):
    """Candidate ids [N, K] (base top-k, K = max_k or else the largest k of the batch) and their PAD
    scores (-inf past a row's own k)."""
    vocab = base_logits.shape[-1]
    k = num_candidates(top_k, vocab)
    kmax = min(max_k, vocab) if max_k is not None else int(k.max())    # int(): a host sync
    zb, cand = base_logits.float().topk(kmax, dim=-1)
    invalid = torch.arange(kmax, device=zb.device)[None, :] >= k[:, None]
    zb = zb.masked_fill(invalid, float("-inf"))
    if reward_logits is None:
        return cand, zb
    zr = reward_logits.float().gather(1, cand).masked_fill(invalid, float("-inf"))
    shift = torch.log_softmax(zr, dim=-1) - torch.log_softmax(zb, dim=-1)
    score = zb + weight.float()[:, None] * shift.masked_fill(invalid, 0.0)
    return cand, score.masked_fill(invalid, float("-inf"))


def pad_sample(base_logits, reward_logits, top_k, weight, temperature, seed, position, max_k=None):
    """Pick one token per row. Every argument after reward_logits is a per-row tensor [N].
    reward_logits may be None (plain top-k decoding) and may be wider than the base vocabulary.
    `max_k` (a host int, at least every row's effective k) spares a host sync, as in a CUDA graph.
    Returns (token_ids [N] int64, logprobs [N] float32: log softmax(score / T) of the choice, T=1 if 0)."""
    cand, score = pad_scores(base_logits, reward_logits, top_k, weight, max_k)
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()[:, None]
    scaled = score / temp
    noisy = (scaled + gumbel_noise(seed, position, cand)).masked_fill(score == float("-inf"), float("-inf"))
    pick = torch.where(greedy, scaled.argmax(-1), noisy.argmax(-1))
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, pick[:, None]).squeeze(1)
    return cand.gather(1, pick[:, None]).squeeze(1), logprobs


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
