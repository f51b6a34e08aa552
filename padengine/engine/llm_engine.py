"""The Engine: the public entry point. It turns prompts into requests (validating everything before any
work starts), feeds them to the scheduler, runs steps on the model runner and returns outputs.
"""
import logging
import os
from itertools import count

from tqdm import tqdm

from padengine.config import EngineConfig
from padengine.engine.model_runner import ModelRunner
from padengine.engine.scheduler import Scheduler
from padengine.engine.sequence import Request, RequestOutput, Sequence
from padengine.errors import InvalidInput, require
from padengine.models.loader import eos_token_ids, load_tokenizer
from padengine.prompts import encode, user_message
from padengine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, base_model: str, reward_model: str | None = None, *, device: str = "cpu",
                 dtype: str = "float32", block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, max_num_seqs: int = 64, max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None, seed: int = 0):
        self.config = cfg = EngineConfig(base_model, reward_model, device, dtype, block_size, num_kv_blocks,
                                         kv_cache_bytes, max_num_seqs, max_num_batched_tokens, max_model_len, seed)
        self.runner = ModelRunner(cfg)
        self.tokenizer = load_tokenizer(base_model, "base_model")
        self.reward_tokenizer = self.tokenizer
        if reward_model is not None and self.runner.reward_pool == 1:
            self.reward_tokenizer = load_tokenizer(reward_model, "reward_model")
            require(self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab(), "reward_model",
                    "its tokenizer vocabulary differs from the base model's")
        self.eos_ids = eos_token_ids(base_model, self.tokenizer)
        self.max_model_len = self.runner.max_model_len
        batched = cfg.max_num_batched_tokens or max(8192, 2 * self.max_model_len)
        self.scheduler = Scheduler(self.runner.pools, max_num_seqs, batched)
        self._ids = count()

    def generate(self, prompts: list[str] | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None, *,
                 preferences: list[str | None] | str | None = None,
                 prompt_token_ids: list[list[int]] | None = None,
                 reward_prompt_token_ids: list[list[int]] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run PAD generation for a batch of prompts; outputs come back in input order."""
        reqs = self.make_requests(prompts, params, preferences, prompt_token_ids, reward_prompt_token_ids)
        for req in reqs:
            self.scheduler.add(req)
        pending = set(r.request_id for r in reqs)
        with tqdm(total=len(reqs), desc="PAD generate", disable=not use_tqdm) as bar:
            while pending:
                done = [r for r in self.step() if r.request_id in pending]
                pending.difference_update(r.request_id for r in done)
                bar.update(len(done))
        return [self.output(r) for r in reqs]

    def step(self) -> list[Request]:
        """Run one scheduler step; returns the requests that finished in it."""
        reqs, is_prefill = self.scheduler.schedule()
        require(bool(reqs), "num_kv_blocks", "no request fits in the KV pool")
        tokens, logprobs = self.runner.run(reqs, is_prefill)
        finished = []
        for req, token, logprob in zip(reqs, tokens, logprobs):
            req.append(token, logprob)
            if req.is_finished:
                self.scheduler.finish(req)
                finished.append(req)
        return finished

    def output(self, req: Request) -> RequestOutput:
        n = req.metrics.num_prompt_tokens
        return RequestOutput(req.request_id, self.tokenizer.decode(req.output_ids, skip_special_tokens=True),
                             list(req.output_ids), req.base.token_ids[:n], req.finish_reason, list(req.logprobs),
                             req.metrics, req.reward.token_ids[:len(req.reward) - len(req.output_ids)]
                             if req.reward is not None else None)

    def make_requests(self, prompts, params, preferences, prompt_token_ids, reward_prompt_token_ids):
        """Validate the whole batch and build its requests; raises InvalidInput before any work."""
        require(prompts is None or prompt_token_ids is None, "prompt_token_ids", "give prompts or token ids, not both")
        items = prompts if prompts is not None else prompt_token_ids
        field = "prompt_token_ids" if prompt_token_ids is not None else "prompts"
        require(isinstance(items, list) and len(items) > 0, field, "no prompts given")
        n = len(items)
        params_list = _per_request(params if params is not None else SamplingParams(), SamplingParams, n, "params")
        require(preferences is None or prompts is not None, "preferences",
                "apply to text prompts; with token ids, put the preference in reward_prompt_token_ids")
        prefs = _per_request(preferences, str, n, "preferences")
        if reward_prompt_token_ids is not None:
            require(prompt_token_ids is not None, "reward_prompt_token_ids", "needs prompt_token_ids")
            require(isinstance(reward_prompt_token_ids, list) and len(reward_prompt_token_ids) == n,
                    "reward_prompt_token_ids", f"must be a list of {n} token-id lists")
        reqs = []
        for i, (item, p, pref) in enumerate(zip(items, params_list, prefs)):
            p.validate(f"params[{i}]" if isinstance(params, list) else "params", self.runner.vocab_size)
            if prompts is not None:
                require(isinstance(item, str) and item.strip() != "", f"prompts[{i}]", "prompt is empty")
                require(pref is None or isinstance(pref, str), f"preferences[{i}]", "must be a string or None")
                base_ids = encode(self.tokenizer, user_message(item, pref if p.preference_in_base else None))
                reward_ids = encode(self.reward_tokenizer, user_message(item, pref))
            else:
                base_ids = self._check_ids(item, f"prompt_token_ids[{i}]")
                reward_ids = base_ids if reward_prompt_token_ids is None else \
                    self._check_ids(reward_prompt_token_ids[i], f"reward_prompt_token_ids[{i}]")
            reqs.append(self._request(base_ids, reward_ids, p, f"{field}[{i}]"))
        return reqs

    def _request(self, base_ids, reward_ids, params: SamplingParams, field: str) -> Request:
        streams = [Sequence(base_ids, 0)]
        if params.guided and self.runner.reward_pool is not None:
            streams.append(Sequence(reward_ids, self.runner.reward_pool))
        pools = self.runner.pools
        need = [0] * len(pools)
        for s in streams:
            total = len(s) + params.max_tokens
            require(total <= self.max_model_len, field,
                    f"{len(s)} prompt tokens + max_tokens {params.max_tokens} exceed max_model_len {self.max_model_len}")
            need[s.pool] += pools[s.pool].blocks_needed(total)
        for n, pool in zip(need, pools):
            require(n <= len(pool.blocks), "num_kv_blocks",
                    f"the KV pool ({len(pool.blocks)} blocks) is too small for {field}, which needs {n}")
        rid = next(self._ids)
        seed = params.seed if params.seed is not None else hash((self.config.seed, rid)) & 0xFFFFFFFFFFFF
        stop = set(params.stop_token_ids or []) | (set() if params.ignore_eos else self.eos_ids)
        req = Request(rid, params, seed, stop, streams)
        req.metrics.num_prompt_tokens = len(base_ids)
        return req

    def _check_ids(self, ids, field: str) -> list[int]:
        require(isinstance(ids, list) and len(ids) > 0, field, "must be a non-empty list of token ids")
        vocab = self.runner.vocab_size
        for t in ids:
            if not (isinstance(t, int) and 0 <= t < vocab):
                raise InvalidInput(field, f"token id {t!r} is outside the vocabulary [0, {vocab})")
        return list(ids)


def _per_request(value, kind, n: int, field: str) -> list:
    """Broadcast a single value to n requests, or check a list has exactly n entries."""
    if isinstance(value, list):
        require(len(value) == n, field, f"has {len(value)} entries for {n} prompts")
        return value
    require(value is None or isinstance(value, kind), field, f"must be a {kind.__name__} or a list of them")
    return [value] * n
