"""The KV pools: how many blocks fit (num_kv_blocks, else kv_cache_bytes, else what the device leaves after a
step's activations), and one pool tensor per model with every layer's K and V as views into it. Which
blocks are free or cached is the host's (engine/block_manager.py: one block manager per model over the
same block count).
"""
import logging

import torch
import torch.distributed as dist

from padengine.config import CPU_KV_BYTES, GPU_KV_FRACTION, EngineConfig
from padengine.errors import require

logger = logging.getLogger(__name__)


def activation_bytes(cfg: EngineConfig, models, max_batched_tokens: int, elem: int) -> int:
    """About the most one step's activations take: every model (they run at once on two streams)
    over a step's tokens (prefill chunks fill what decoding leaves of max_batched_tokens; allow one
    decode row more per sequence for a step whose decoding alone passes it), at its widest point
    (residual, normed input and the MLP's gate/up and product, or the attention projections)."""
    tokens, total = max_batched_tokens + cfg.max_num_seqs, 0
    for m in filter(None, models):
        c = m.config
        attn = 2 * c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim
        total += tokens * (2 * c.hidden_size + max(3 * c.intermediate_size, attn)) * elem
    return total


def allocate_kv(cfg: EngineConfig, models, device: torch.device, world_size: int, max_batched_tokens: int,
                max_model_len: int) -> int:
    """The number of blocks each pool holds, its pools allocated and handed to the models' layers, with one
    block more: the sink block, owned by no sequence, where padded graph rows write. With several ranks
    every rank gets the fewest blocks any of them fits, so that block ids agree."""
    bs = cfg.block_size
    elem = torch.empty((), dtype=cfg.torch_dtype).element_size()
    kv_heads = [0 if m is None else m.tp.heads(m.config.num_heads, m.config.num_kv_heads)[1] for m in models]
    block_bytes = [0 if m is None else 2 * m.config.num_layers * bs * h * m.config.head_dim * elem
                   for m, h in zip(models, kv_heads)]
    num_blocks = cfg.num_kv_blocks
    if num_blocks is None:
        budget = cfg.kv_cache_bytes
        if budget is None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            peak = activation_bytes(cfg, models, max_batched_tokens, elem)
            require(peak < free, "max_num_batched_tokens", f"a step's activations need about "
                    f"{peak / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free: lower it")
            budget = int((free - peak) * GPU_KV_FRACTION)
        elif budget is None:
            full = cfg.max_num_seqs * 2 * -(-max_model_len // bs) * sum(block_bytes)
            budget = min(CPU_KV_BYTES, full)
        num_blocks = budget // sum(block_bytes)
        require(num_blocks >= 1, "kv_cache_bytes", f"{budget} bytes hold no block of {sum(block_bytes)} bytes")
    if world_size > 1:
        agreed = torch.tensor([num_blocks], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        num_blocks = int(agreed)
    for model, heads, nbytes in zip(models, kv_heads, block_bytes):
        if model is None:
            continue
        c = model.config
        # zeroed, not empty: masked-out padding still enters attention as 0 * V, and 0 * NaN is NaN
        kv = torch.zeros(2, c.num_layers, num_blocks + 1, bs, heads, c.head_dim, dtype=cfg.torch_dtype, device=device)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = kv[0, i], kv[1, i]
        logger.info("KV pool: %d blocks of %d tokens (%.1f MiB)", num_blocks, bs, num_blocks * nbytes / 2**20)
    return num_blocks
