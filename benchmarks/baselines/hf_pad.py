"""PAD written directly on transformers' own model classes: the slow reference the engine is tested
against, and the baseline it is benchmarked against.

One request at a time, as the authors' code runs, but with a KV cache per model and a stop at the
end-of-sequence token. Per step: base logits z_b, reward logits z_r_j for each preference j (through the
value head when the reward folder has one), candidates C = top-k of z_b,
score = z_b + sum_j w_j * (log_softmax_C(z_r_j) - log_softmax_C(z_b)), greedy argmax.
"""
import inspect
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache, LlamaForCausalLM


# transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version takes
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class HFPad:
    def __init__(self, base_path: str, reward_path: str | None = None, dtype=torch.float32, device="cpu"):
        self.device = device
        self.base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device).eval()
        self.reward, self.value_head = None, None
        if reward_path is not None:
            same = os.path.realpath(reward_path) == os.path.realpath(base_path)
            self.reward = self.base if same else \
                AutoModelForCausalLM.from_pretrained(reward_path, dtype=dtype).to(device).eval()
            self.value_head = _value_head(reward_path, self.reward.config.hidden_size, dtype, device)

    @torch.inference_mode()
    def generate(self, base_ids: list[int], rewards: list[tuple[list[int], float]], max_tokens: int,
                 top_k: int = 10, eos_ids: set[int] = frozenset()) -> list[int]:
        """Greedy PAD for one request. `rewards` holds one (reward prompt ids, weight) per preference:
        score = z_b + sum_j w_j * (log_softmax_C(z_r_j) - log_softmax_C(z_b))."""
        rewards = [(ids, w) for ids, w in rewards if w != 0] if self.reward is not None else []
        caches = [{CACHE_ARG: DynamicCache()} for _ in range(1 + len(rewards))]
        inputs = [torch.tensor([ids], device=self.device) for ids in [base_ids] + [ids for ids, _ in rewards]]
        out = []
        for _ in range(max_tokens):
            z_b = self.base(inputs[0], **caches[0], use_cache=True, logits_to_keep=1).logits[0, -1]
            vocab = z_b.shape[-1]
            zb, cand = z_b.float().topk(vocab if top_k == 0 or top_k >= vocab else top_k)
            score = zb
            for (_, w), x, cache in zip(rewards, inputs[1:], caches[1:]):
                h = self.reward.model(x, **cache, use_cache=True).last_hidden_state[0, -1]
                if self.value_head is not None:
                    h = self.value_head(h)
                z_r = self.reward.lm_head(h).float()
                score = score + w * (torch.log_softmax(z_r[cand], -1) - torch.log_softmax(zb, -1))
            token = int(cand[score.argmax()])
            out.append(token)
            if token in eos_ids:
                break
            inputs = [torch.tensor([[token]], device=self.device)] * len(inputs)
        return out


def _value_head(path: str, hidden: int, dtype, device) -> torch.nn.Linear | None:
    for name in ("value_head.safetensors", "value_head.bin"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            state = load_file(file) if name.endswith(".safetensors") else torch.load(file, weights_only=True)
            head = torch.nn.Linear(hidden, hidden)
            head.load_state_dict({"weight": state["summary.weight"], "bias": state["summary.bias"]})
            return head.to(device=device, dtype=dtype).eval()
    return None
