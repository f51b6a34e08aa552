"""Turning user input into requests: prompt rendering, preference parsing and all per-request validation.

A request is built only after the whole batch has been checked, so bad input raises `InvalidInput`
(naming the field) before anything is queued. A preference entry is a string, None, or a list of
(text, weight) pairs; each weighted preference becomes its own reward stream. Preferences are parsed and
text prompts rendered by `padengine.prompts` (shared with the server); here a text prompt is one user
message under the chat template.
"""
from itertools import count

from padengine.executor.placement import Placement
from padengine.engine.block_manager import BlockManager
from padengine.engine.sequence import Request, Sequence
from padengine.errors import InvalidInput, require, require_range
from padengine.prompts import encode_prompt, preference_pairs, render
from padengine.sampling_params import MAX_WEIGHT, SamplingParams


class InputProcessor:
    def __init__(self, tokenizer, reward_tokenizer, vocab_size: int, max_model_len: int, eos_ids: set[int],
                 pools: list[BlockManager], placement: Placement, seed: int, max_num_seqs: int):
        self.tokenizer, self.reward_tokenizer = tokenizer, reward_tokenizer
        self.vocab_size, self.max_model_len, self.eos_ids = vocab_size, max_model_len, eos_ids
        self.pools, self.seed, self.max_num_seqs = pools, seed, max_num_seqs
        self.reward_pool = placement.reward      # None: no reward model
        self._ids = count()

    def make_requests(self, prompts, params, preferences, prompt_token_ids, reward_prompt_token_ids) -> list[Request]:
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
                    "reward_prompt_token_ids", f"must be a list of {n} entries")
        built = []
        for i, (item, p) in enumerate(zip(items, params_list)):
            p.validate(f"params[{i}]" if isinstance(params, list) else "params", self.vocab_size)
            if prompts is not None:
                base_ids, rewards = self._from_text(item, prefs[i], p, i)
            else:
                base_ids = self._check_ids(item, f"prompt_token_ids[{i}]")
                entry = None if reward_prompt_token_ids is None else reward_prompt_token_ids[i]
                rewards = self._reward_ids(entry, base_ids, p.weight, f"reward_prompt_token_ids[{i}]")
            built.append(self._check_fits(base_ids, rewards, p, f"{field}[{i}]"))
        return [req for b in built for req in self._group(*b)]

    def _from_text(self, prompt, preference, params: SamplingParams, i: int):
        require(isinstance(prompt, str) and prompt.strip() != "", f"prompts[{i}]", "prompt is empty")
        prefs = preference_pairs(preference, params.weight, f"preferences[{i}]")
        base_ids, rewards = render(self.tokenizer, self.reward_tokenizer, prompt, prefs,
                                   params.preference_in_base, chat_template=True)
        return base_ids, rewards or [(encode_prompt(self.reward_tokenizer, prompt, None, chat_template=True),
                                      params.weight)]

    def _reward_ids(self, entry, base_ids, weight: float, field: str) -> list[tuple[list[int], float]]:
        if entry is None:
            return [(base_ids, weight)]
        require(isinstance(entry, list) and len(entry) > 0, field, "must be token ids or (token_ids, weight) pairs")
        if all(isinstance(t, int) for t in entry):
            return [(self._check_ids(entry, field), weight)]
        pairs = []
        for j, pair in enumerate(entry):
            require(isinstance(pair, (tuple, list)) and len(pair) == 2, f"{field}[{j}]",
                    "must be a (token_ids, weight) pair")
            require_range(pair[1], -MAX_WEIGHT, MAX_WEIGHT, f"{field}[{j}].weight")
            pairs.append((self._check_ids(pair[0], f"{field}[{j}]"), float(pair[1])))
        return pairs

    def _check_ids(self, ids, field: str) -> list[int]:
        require(isinstance(ids, list) and len(ids) > 0, field, "must be a non-empty list of token ids")
        for t in ids:
            if not (isinstance(t, int) and 0 <= t < self.vocab_size):
                raise InvalidInput(field, f"token id {t!r} is outside the vocabulary [0, {self.vocab_size})")
        return list(ids)

    def _check_fits(self, base_ids, rewards, params: SamplingParams, field: str):
        """Keep only the reward streams that count; check lengths and the worst-case block need."""
        if self.reward_pool is None:
            rewards = []
        rewards = [(ids, w) for ids, w in rewards if w != 0]
        need = [0] * len(self.pools)
        for ids, pool in [(base_ids, 0)] + [(ids, self.reward_pool) for ids, _ in rewards]:
            total = len(ids) + params.max_tokens
            require(total <= self.max_model_len, field, f"{len(ids)} prompt tokens + max_tokens "
                    f"{params.max_tokens} exceed max_model_len {self.max_model_len}")
            need[pool] += self.pools[pool].blocks_needed(total) * params.n   # a group is admitted whole
        require(params.n <= self.max_num_seqs, "params.n", f"{params.n} choices exceed max_num_seqs "
                f"{self.max_num_seqs} (a prompt's choices run together)")
        for n, pool in zip(need, self.pools):
            require(n <= len(pool.blocks), "num_kv_blocks",
                    f"the KV pool ({len(pool.blocks)} blocks) is too small for {field}, which needs {n}")
        return base_ids, rewards, params

    def _group(self, base_ids, rewards, params: SamplingParams) -> list[Request]:
        """The params.n requests (choices) of one prompt: choice 0 draws with the request's seed, choice j
        with one derived from it and j; they share one prompt prefill through the prefix cache."""
        group = []
        for j in range(params.n):
            rid = next(self._ids)
            if params.seed is None:
                seed = hash((self.seed, rid)) & 0xFFFFFFFFFFFF
            else:
                seed = hash((params.seed, j)) & 0xFFFFFFFFFFFF if j else params.seed
            stop = set(params.stop_token_ids or []) | (set() if params.ignore_eos else self.eos_ids)
            streams = [Sequence(base_ids, 0)] + [Sequence(ids, self.reward_pool) for ids, _ in rewards]
            req = Request(rid, params, seed, stop, streams, [w for _, w in rewards], choice=j)
            req.metrics.num_prompt_tokens = len(base_ids)
            group.append(req)
        for req in group:
            req.group = group
        return group


def _per_request(value, kind, n: int, field: str) -> list:
    """Broadcast a single value to n requests, or check a list has exactly n entries."""
    if isinstance(value, list):
        require(len(value) == n, field, f"has {len(value)} entries for {n} prompts")
        return value
    require(value is None or isinstance(value, kind), field, f"must be a {kind.__name__} or a list of them")
    return [value] * n
