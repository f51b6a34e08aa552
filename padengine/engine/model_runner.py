"""Runs one step on the models: builds the flattened inputs, runs each model once over all of its
streams, computes base and reward logits of the last token of each stream, and samples.

When base and reward are the same folder the weights are loaded once and both roles share one model
and one KV pool: a step then runs a single forward over base and reward streams together (and a
reward prompt equal to the base prompt hits the base stream's prefix-cached blocks).
"""
import logging
import os

import torch

from padengine.config import CPU_KV_BYTES, GPU_KV_FRACTION, EngineConfig
from padengine.engine.block_manager import BlockManager
from padengine.engine.sequence import Request, Sequence
from padengine.errors import require
from padengine.layers.attention import AttnBatch
from padengine.layers.sampler import merge_rewards, pad_sample
from padengine.models.loader import load_config, load_model, load_value_head

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, cfg: EngineConfig):
        self.cfg, self.device = cfg, cfg.torch_device
        paths = [cfg.base_model]
        fields = ["base_model"]
        model_cfgs = [load_config(cfg.base_model, "base_model")]
        self.reward_pool = None
        if cfg.reward_model is not None:
            if os.path.realpath(cfg.reward_model) == os.path.realpath(cfg.base_model):
                self.reward_pool = 0
            else:
                self.reward_pool = 1
                paths.append(cfg.reward_model)
                fields.append("reward_model")
                model_cfgs.append(load_config(cfg.reward_model, "reward_model"))
            require(model_cfgs[-1].vocab_size >= model_cfgs[0].vocab_size, "reward_model",
                    f"its vocabulary ({model_cfgs[-1].vocab_size}) is smaller than the base's "
                    f"({model_cfgs[0].vocab_size})")
        limit = min(c.max_position_embeddings for c in model_cfgs)
        self.max_model_len = cfg.max_model_len or limit
        require(self.max_model_len <= limit, "max_model_len",
                f"{self.max_model_len} exceeds the models' max_position_embeddings ({limit})")
        self.vocab_size = model_cfgs[0].vocab_size
        self.models = [load_model(p, c, self.max_model_len, cfg.torch_dtype, self.device, f)
                       for p, c, f in zip(paths, model_cfgs, fields)]
        self.value_head = None
        if cfg.reward_model is not None:
            self.value_head = load_value_head(cfg.reward_model, model_cfgs[-1].hidden_size, cfg.torch_dtype,
                                              self.device, "reward_model")
        self.pools = self._allocate_kv()
        two_on_cuda = self.device.type == "cuda" and len(self.models) == 2
        self.side_stream = torch.cuda.Stream(self.device) if two_on_cuda else None
        self.sample = pad_sample
        if cfg.kernels == "triton":
            self._use_triton()

    def _use_triton(self) -> None:
        """Swap in the Triton kernels, which take the torch references' arguments one for one."""
        import triton_kernels
        for model in self.models:
            for layer in model.model.layers:
                layer.self_attn.store, layer.self_attn.attend = triton_kernels.write_kv, triton_kernels.paged_attention
        self.sample = triton_kernels.pad_sample

    def _allocate_kv(self) -> list[BlockManager]:
        cfg, bs = self.cfg, self.cfg.block_size
        elem = torch.empty((), dtype=cfg.torch_dtype).element_size()
        block_bytes = [2 * m.config.num_layers * bs * m.config.num_kv_heads * m.config.head_dim * elem
                       for m in self.models]
        num_blocks = cfg.num_kv_blocks
        if num_blocks is None:
            budget = cfg.kv_cache_bytes
            if budget is None and self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * GPU_KV_FRACTION)
            elif budget is None:
                full = cfg.max_num_seqs * 2 * -(-self.max_model_len // bs) * sum(block_bytes)
                budget = min(CPU_KV_BYTES, full)
            num_blocks = budget // sum(block_bytes)
            require(num_blocks >= 1, "kv_cache_bytes", f"{budget} bytes hold no block of {sum(block_bytes)} bytes")
        pools = []
        for model, nbytes in zip(self.models, block_bytes):
            c = model.config
            # zeroed, not empty: masked-out padding still enters attention as 0 * V, and 0 * NaN is NaN
            kv = torch.zeros(2, c.num_layers, num_blocks, bs, c.num_kv_heads, c.head_dim,
                             dtype=cfg.torch_dtype, device=self.device)
            for i, layer in enumerate(model.model.layers):
                layer.self_attn.k_cache, layer.self_attn.v_cache = kv[0, i], kv[1, i]
            pools.append(BlockManager(num_blocks, bs))
            logger.info("KV pool: %d blocks of %d tokens (%.1f MiB)", num_blocks, bs, num_blocks * nbytes / 2**20)
        return pools

    @torch.inference_mode()
    def run(self, decode: list[Request], prefill: list[Request]) -> tuple[list[int], list[float]]:
        """One step: the next token of each request (decode, then prefill) and its log-probability."""
        reqs = decode + prefill
        rewards = [(i, s, w) for i, r in enumerate(reqs) for s, w in zip(r.rewards, r.weights)]
        streams = [[] for _ in self.models]
        for s in [r.base for r in reqs] + [s for _, s, _ in rewards]:
            streams[s.pool].append(s)
        hidden = self._forward_all(streams, set(id(s) for r in prefill for s in r.streams))
        base_logits = self.models[0].logits(hidden[0][:len(reqs)])
        tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.device)
        reward_logits, weight = None, torch.zeros(len(reqs), device=self.device)
        if rewards:
            start = len(reqs) if self.reward_pool == 0 else 0
            rows = self.models[self.reward_pool].logits(hidden[self.reward_pool][start:start + len(rewards)],
                                                        self.value_head)
            reward_logits, weight = merge_rewards(base_logits, rows, tensor([i for i, _, _ in rewards], torch.long),
                                                  tensor([w for _, _, w in rewards], torch.float32))
        p = [r.params for r in reqs]
        tokens, logprobs = self.sample(
            base_logits, reward_logits, tensor([x.top_k for x in p], torch.long), weight,
            tensor([x.temperature for x in p], torch.float32), tensor([r.seed for r in reqs], torch.long),
            tensor([len(r.output_ids) for r in reqs], torch.long))
        return tokens.tolist(), logprobs.tolist()

    def _forward_all(self, streams: list[list[Sequence]], prefilling: set[int]) -> list[torch.Tensor | None]:
        """Each model's forward over its streams (`prefilling` holds the ids of streams being prefilled).
        On CUDA with two models, the reward model runs on a side stream, forked from and joined to the
        main one, so a small reward model hides behind a large base."""
        if self.side_stream is None or not all(streams):
            return [self._forward(p, s, prefilling) if s else None for p, s in enumerate(streams)]
        main = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            reward = self._forward(1, streams[1], prefilling)
        base = self._forward(0, streams[0], prefilling)
        main.wait_stream(self.side_stream)
        reward.record_stream(main)
        return [base, reward]

    def _forward(self, pool: int, seqs: list[Sequence], prefilling: set[int]) -> torch.Tensor:
        """Hidden state of the last token of each sequence, [len(seqs), hidden], in the order given.
        Decoding sequences go first in the batch (attention batches them), prefilling ones after."""
        order = sorted(range(len(seqs)), key=lambda i: id(seqs[i]) in prefilling)
        seqs = [seqs[i] for i in order]
        num_decode = sum(id(s) not in prefilling for s in seqs)
        bs = self.cfg.block_size
        starts = [len(s) - 1 if i < num_decode else s.num_cached_tokens for i, s in enumerate(seqs)]
        lens = [len(s) for s in seqs]
        ids = [t for s, a in zip(seqs, starts) for t in s.token_ids[a:]]
        positions = torch.tensor([p for a, n in zip(starts, lens) for p in range(a, n)], device=self.device)
        owner = torch.tensor([i for i, (a, n) in enumerate(zip(starts, lens)) for _ in range(a, n)],
                             device=self.device)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                              dtype=torch.long, device=self.device)
        slots = tables[owner, positions // bs] * bs + positions % bs
        query_lens = [n - a for a, n in zip(starts, lens)]
        batch = AttnBatch(num_decode, slots, tables, torch.tensor(lens, device=self.device), query_lens, lens,
                          self.models[pool].config.sliding_window)
        # every host-to-device copy before the forward: a copy after it would wait for it (on CUDA, and
        # so keep the base forward from being launched while the reward forward runs on its side stream)
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
        inverse = torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=self.device)
        hidden = self.models[pool](torch.tensor(ids, device=self.device), positions, batch)
        return hidden[last][inverse]
