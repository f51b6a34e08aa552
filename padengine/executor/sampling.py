"""A step's PAD math after the forwards, for the rows this rank holds: the logits of the models it holds
(base rows, reward streams through the value head), their penalties, the reward streams merged into one
reward row per request, and one token drawn per row.

Placement decides only what a rank computes and exchanges, once, when `Sampling` is built: on one device
whole rows go to the op set's fused sampler; with rows split over ranks (tensor parallelism, or a reward
model on a rank of its own) distributed/sampler.py gathers and exchanges the candidates, and a reward-only
rank's part ends with its exchange (None). Every rank calls it the same way.
"""
import torch

from padengine.distributed.sampler import exchange, tp_candidates, tp_logprobs
from padengine.executor.placement import Placement
from padengine.executor.step import StepInputs, StepResult, fed, sampler_kwargs
from padengine.layers.sampler import Sample, candidate_scores, candidates, choose, merge_rewards, penalizer


class Sampling:
    """hidden states -> logits -> penalties -> merge -> draw, for the rows this rank holds."""

    def __init__(self, models: list, value_head, placement: Placement, shards: list, vocab: int, sample,
                 sampled_tokens: torch.Tensor | None, device: torch.device):
        """`sample`: the op set's fused sampler; `sampled_tokens`: where the asynchronous loop's previous
        step left its tokens (PENDING ids are read there)."""
        self.models, self.value_head, self.reward = models, value_head, placement.reward
        self.vocab, self.sampled_tokens, self.device = vocab, sampled_tokens, device
        self.shard = shards[0]              # the base model's on this rank; None on a reward-only rank
        self.columns = slice(*next(filter(None, shards)).vocab_range(vocab))    # the ids this rank's logits hold
        self.reward_rank = placement.models[1].ranks[0] if placement.reward_apart else None
        split = placement.reward_apart or self.shard.size > 1
        self.draw = self._split if split else self._whole       # what this placement runs and exchanges
        self.fused = sample

    def __call__(self, x: StepInputs, hidden: list[torch.Tensor | None]) -> StepResult | None:
        """The step's tokens (and base log-probabilities) from each held model's hidden states at its picked
        streams; None on a reward-only rank."""
        penalize = None
        if x.penalties is not None:
            generated = fed(x.penalties.generated_tokens, x.penalties.generated_feed, self.sampled_tokens)
            penalize = penalizer(x.penalties, generated, x.num_rows, self.vocab, self.columns)
        raw = base = rewards = None
        if self.models[0] is not None:
            raw = base = self.models[0].logits(hidden[0][:x.num_rows])
            if penalize:
                base = penalize(base, slice(0, x.num_rows))
        if x.num_rewards and self.models[self.reward] is not None:
            streams = hidden[self.reward][x.reward_start:x.reward_start + x.num_rewards]
            rewards = self.models[self.reward].logits(streams, self.value_head)
            if penalize:
                rewards = penalize(rewards, x.rewards.owner)
        sample = self.draw(x, base, rewards)
        if sample is None:
            return None
        return StepResult(sample, self._base_logprobs(raw, sample.tokens) if x.base_logprobs else None)

    def _whole(self, x: StepInputs, base: torch.Tensor, rewards: torch.Tensor | None) -> Sample:
        merged, weight = None, torch.zeros(x.num_rows, device=self.device)
        if rewards is not None:
            merged, weight = merge_rewards(base, rewards, x.rewards.owner, x.rewards.weights)
        return self.fused(base, merged, weight=weight, max_k=x.max_k, num_top=x.num_top, **sampler_kwargs(x.rows))

    def _split(self, x: StepInputs, base: torch.Tensor | None, rewards: torch.Tensor | None) -> Sample | None:
        """Logits split: the base's across the ranks of this rank's shard (its slice; None on a reward-only
        rank), the reward streams' on the same ranks or on the rank of their own (`reward_rank`)."""
        kwargs = sampler_kwargs(x.rows)
        top_k = kwargs.pop("top_k")     # the candidates' count; the rest is the draw's
        owner, weights = (x.rewards.owner, x.rewards.weights) if x.rewards is not None else (None, None)
        weight, tp = torch.zeros(x.num_rows, device=self.device), self.shard
        if self.reward_rank is None:
            merged = None
            if rewards is not None:
                merged, weight = merge_rewards(base, rewards, owner, weights)
            cand, zb, zr, invalid = tp_candidates(base, merged, top_k, x.max_k, self.vocab, tp)
        else:
            cand = zb = zr = invalid = None
            if base is not None and tp.size == 1:
                cand, zb, invalid = candidates(base, top_k, x.max_k)
            elif base is not None:
                cand, zb, _, invalid = tp_candidates(base, None, top_k, x.max_k, self.vocab, tp)
            if x.num_rewards:
                shape = (x.num_rows, min(x.max_k, self.vocab))
                zr, weight = exchange(cand, zb, rewards, owner, weights, shape, self.reward_rank, self.device)
            if base is None:
                return None     # the reward rank: its part was the exchange
        score = zb if zr is None else candidate_scores(zb, zr, weight, invalid)
        return choose(cand, score, num_top=x.num_top, **kwargs)

    def _base_logprobs(self, raw: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The base model's own log-probability of each chosen token (whole vocabulary, before penalties)."""
        if self.shard.size > 1:
            return tp_logprobs(raw, tokens, self.vocab, self.shard)
        return torch.log_softmax(raw.float(), -1).gather(1, tokens[:, None]).squeeze(1)
