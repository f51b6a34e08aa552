"""Attention through flash-attn 2 over the paged KV cache (`kernels="flash"`, the CUDA default when the
`flash_attn` package imports).

flash-attn reads the cache in padengine's own layout, [num_blocks, block_size, kv_heads, head_dim] with a
block size that is a multiple of 256, through int32 block tables: `flash_attn_with_kvcache` attends the
decoding sequences, `flash_attn_varlen_func` the prefilling ones (its causal mask aligns each sequence's
queries with the end of its context, so a cached prefix is attended fully and new tokens causally).
New K/V are written to the cache before, as for the other backends.
"""
import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from padengine.layers.attention import AttnBatch
from padengine.layers.attention import paged_attention as split_paged_attention


def paged_attention(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """Drop-in for the torch `paged_attention`: same arguments, same result within tolerance."""
    return split_paged_attention(q, k_cache, v_cache, batch, scale, decode=_decode, prefill=_prefill)


def _window(batch: AttnBatch) -> tuple[int, int]:
    """flash-attn's (left, right) window: a query sees keys at most window - 1 positions back."""
    return (-1, -1) if batch.window is None else (batch.window - 1, 0)


def _decode(q, k_cache, v_cache, batch, scale):
    out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=batch.context_lens.to(torch.int32),
                                  block_table=batch.block_tables.to(torch.int32), softmax_scale=scale, causal=True,
                                  window_size=_window(batch))
    return out.squeeze(1)


def _prefill(q, k_cache, v_cache, batch, scale):
    cu_k = F.pad(batch.context_lens.cumsum(0), (1, 0)).to(torch.int32)
    return flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=batch.cu_seqlens.to(torch.int32),
                                  cu_seqlens_k=cu_k, max_seqlen_q=max(batch.query_lens),
                                  max_seqlen_k=batch.max_context(k_cache.shape[1]), softmax_scale=scale,
                                  causal=True, window_size=_window(batch),
                                  block_table=batch.block_tables.to(torch.int32))
