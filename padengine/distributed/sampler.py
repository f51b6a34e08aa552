"""The PAD sampler when no rank holds a whole logits row.

With a vocabulary-parallel LM head a rank holds the base logits (and, when the reward model shares its
ranks, the merged reward logits) of its slice of ids only. `tp_candidates`: each rank takes its local top-k
of the base logits, the ranks all-gather k (id, z_b, z_r) triples per row, and the top-k of those is the
global candidate set C with its base and reward logits. The PAD score needs nothing else (the log-softmax
over C reads C's logits only), so `candidate_scores` and `choose` give the single-device result
(executor/sampling.py puts the pieces together for each placement). No rank gathers a whole row, except
that a whole-vocabulary row (top_k=0) makes every id a candidate.

With the reward model on a rank of its own, `exchange` sends the candidates' ids and base logits (N x k)
to it; it merges its streams at those ids and sends N x k reward logits (and the row weights) back.
"""
import torch
import torch.distributed as dist

from padengine.distributed.parallel import Shard
from padengine.layers.sampler import merge_rewards, num_candidates


def tp_candidates(base, reward, top_k, max_k: int, vocab: int, tp: Shard):
    """Candidate ids [N, K], their base logits (-inf past a row's own k), reward logits (None without
    `reward`) and the mask `invalid`, as `layers.sampler.candidates` gives for whole rows. `base` [N, V_l]
    and `reward` [N, >= V_l] are this rank's slice (`tp.vocab_range(vocab)`) of the rows."""
    start, _ = tp.vocab_range(vocab)
    k = num_candidates(top_k, vocab)
    kmax = min(max_k, vocab)
    width = min(kmax, tp.vocab_chunk)        # every rank sends this many per row, -inf padded
    zb, at = base.float().topk(min(width, base.shape[1]), dim=-1)
    parts = [at.float() + start, zb] + ([] if reward is None else [reward.float().gather(1, at)])
    local = zb.new_full((zb.shape[0], width, len(parts)), float("-inf"))
    local[..., 0] = 0       # ids are exact in float32 (vocabularies stay below 2^24)
    local[:, :zb.shape[1]] = torch.stack(parts, -1)
    gathered = [torch.empty_like(local) for _ in range(tp.size)]
    dist.all_gather(gathered, local, group=tp.group)
    pool = torch.cat(gathered, 1)
    zb, pick = pool[..., 1].topk(kmax, dim=-1)
    invalid = torch.arange(kmax, device=zb.device)[None, :] >= k[:, None]
    zr = None if reward is None else pool[..., 2].gather(1, pick)
    return pool[..., 0].gather(1, pick).long(), zb.masked_fill(invalid, float("-inf")), zr, invalid


def tp_logprobs(raw, tokens, vocab: int, tp: Shard) -> torch.Tensor:
    """log_softmax over the whole vocabulary at `tokens` [N], from each rank's slice `raw` [N, V_l]."""
    start, _ = tp.vocab_range(vocab)
    z = raw.float()
    local = tokens - start
    outside = (local < 0) | (local >= z.shape[1])
    chosen = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1).masked_fill(outside, float("-inf"))
    mine = torch.stack([torch.logsumexp(z, -1), chosen], -1)
    gathered = [torch.empty_like(mine) for _ in range(tp.size)]
    dist.all_gather(gathered, mine, group=tp.group)
    every = torch.stack(gathered)
    return every[..., 1].max(0).values - torch.logsumexp(every[..., 0], 0)


def exchange(cand, zb, rows, owner, weights, shape: tuple[int, int], reward_rank: int, device):
    """Every rank: the merged reward logits at the candidates [N, K] and the row weights [N]. The base side
    passes `cand`, `zb` (rows None), the reward side its streams' logits `rows` (cand, zb None)."""
    n, k = shape
    sent = torch.stack([cand.float(), zb], -1) if cand is not None else torch.empty(n, k, 2, device=device)
    dist.broadcast(sent, src=0)
    back = torch.empty(n, k + 1, device=device)
    if rows is not None:
        cand, zb = sent[..., 0].long(), sent[..., 1]
        at = cand[owner.clamp(max=n - 1)]          # owner n: a padding stream, dropped by the merge
        merged, weight = merge_rewards(zb, rows.float().gather(1, at), owner, weights)
        back = torch.cat([merged, weight[:, None]], 1)
    dist.broadcast(back, src=reward_rank)
    return back[:, :k], back[:, k]
