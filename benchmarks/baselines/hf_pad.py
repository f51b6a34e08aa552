"""PAD written directly on transformers' own model classes: the slow reference the engine is tested
against, and the baseline it is benchmarked against.

As the authors' code runs, but with a KV cache per model and a stop at the end-of-sequence token. Per
step: base logits z_b, reward logits z_r_j for each preference j (through the value head when the reward
folder has one), candidates C = top-k of z_b,
score = z_b + sum_j w_j * (log_softmax_C(z_r_j) - log_softmax_C(z_b)), greedy argmax.
`generate` runs one request (the test reference); `generate_batch` runs a left-padded batch (the GPU
benchmark's batched baseline).
"""
import inspect
import os

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForCausalLM

from padengine.models.value_head import load as load_value_head

# transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version takes
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class HFPad:
    def __init__(self, base, reward=None, value_head: torch.nn.Linear | None = None):
        self.base, self.reward, self.value_head = base, reward, value_head
        self.device = base.device

    @classmethod
    def load(cls, base_path: str, reward_path: str | None = None, dtype=torch.float32, device="cpu") -> "HFPad":
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device).eval()
        if reward_path is None:
            return cls(base)
        same = os.path.realpath(reward_path) == os.path.realpath(base_path)
        reward = base if same else AutoModelForCausalLM.from_pretrained(reward_path, dtype=dtype).to(device).eval()
        return cls(base, reward, load_value_head(reward_path, reward.config.hidden_size, dtype, device, "reward"))

    def generate(self, base_ids: list[int], rewards: list[tuple[list[int], float]], max_tokens: int,
                 top_k: int = 10, eos_ids: set[int] = frozenset(), processors=None) -> list[int]:
        """Greedy PAD for one request; `rewards` holds one (reward prompt ids, weight) per preference."""
        rewards = [(ids, w) for ids, w in rewards if w != 0]
        return self.generate_batch([base_ids], [[ids] for ids, _ in rewards], [w for _, w in rewards],
                                   max_tokens, top_k, eos_ids, processors)[0]

    @torch.inference_mode()
    def generate_batch(self, base_ids: list[list[int]], reward_ids: list[list[list[int]]], weights: list[float],
                       max_tokens: int, top_k: int = 10, eos_ids: set[int] = frozenset(),
                       processors=None) -> list[list[int]]:
        """Greedy PAD for a batch: reward_ids[j][b] is request b's prompt for preference j (weight j).
        `processors` (transformers' LogitsProcessorList, e.g. penalties) see the base prompt and the
        tokens so far, and rework the base logits and, with the same ids, each reward model's."""
        process = lambda logits: logits
        if processors is not None:
            history = lambda: torch.tensor([b + o for b, o in zip(base_ids, out)], device=self.device)
            process = lambda logits: processors(history(), logits.float())
        if self.reward is None:
            reward_ids, weights = [], []
        streams = [_Stream(self.base, base_ids, logits=True)] + [_Stream(self.reward, ids) for ids in reward_ids]
        batch = len(base_ids)
        out, done = [[] for _ in range(batch)], torch.zeros(batch, dtype=torch.bool, device=self.device)
        for _ in range(max_tokens):
            z_b = process(streams[0].step())
            vocab = z_b.shape[-1]
            zb, cand = z_b.float().topk(vocab if top_k == 0 or top_k >= vocab else top_k, dim=-1)
            score = zb
            for stream, w in zip(streams[1:], weights):
                h = stream.step()
                z_r = process(self.reward.lm_head(self.value_head(h) if self.value_head is not None else h))
                score = score + w * (torch.log_softmax(z_r.gather(1, cand), -1) - torch.log_softmax(zb, -1))
            tokens = cand.gather(1, score.argmax(-1, keepdim=True)).squeeze(1)
            for b, t in enumerate(tokens.tolist()):
                if not done[b]:
                    out[b].append(t)
            done |= torch.tensor([t in eos_ids for t in tokens.tolist()], device=self.device)
            if done.all():
                break
            for stream in streams:
                stream.feed(tokens)
        return out


class _Stream:
    """One model's KV-cached context for a left-padded batch; `step` returns the last position's base
    logits (logits=True) or final hidden state."""

    def __init__(self, model, ids: list[list[int]], logits: bool = False):
        self.model, self.logits, self.cache = model, logits, {CACHE_ARG: DynamicCache()}
        width, dev = max(map(len, ids)), model.device
        self.input = torch.tensor([[0] * (width - len(x)) + x for x in ids], device=dev)
        self.mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=dev)
        self.padded = len(ids) > 1        # batch 1 runs unmasked: the reference path, as plain as it gets

    def step(self) -> torch.Tensor:
        kw = {}
        if self.padded:
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -self.input.shape[1]:]
            kw = dict(attention_mask=self.mask, position_ids=positions)
        if self.logits:
            return self.model(self.input, **self.cache, **kw, use_cache=True, logits_to_keep=1).logits[:, -1]
        return self.model.model(self.input, **self.cache, **kw, use_cache=True).last_hidden_state[:, -1]

    def feed(self, tokens: torch.Tensor) -> None:
        self.input = tokens[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.input)], dim=1)
