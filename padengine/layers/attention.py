"""Attention over the paged KV cache (torch reference backend, runs on CPU and CUDA).

The cache of one layer is K and V of shape [num_blocks, block_size, kv_heads, head_dim]. A step's tokens
are flattened over all sequences, decoding sequences (one token each) first, then prefilling ones;
`AttnBatch` says where each token's K/V goes (slot_mapping) and which blocks each sequence reads
(block_tables). New K/V are written before attention reads, so sequences in one batch that share
prefix-cached blocks see each other's freshly written entries.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnBatch:
    num_decode: int                 # the first num_decode sequences decode one token; the rest prefill
    slot_mapping: torch.Tensor      # [T] flat cache slot of every new token
    block_tables: torch.Tensor      # [B, max_blocks] (padded with 0; padding is masked)
    context_lens: torch.Tensor      # [B] tokens in the cache after this step
    query_lens: list[int]           # per sequence, tokens computed this step
    context_lens_cpu: list[int] | None  # host copy, to size work without a device sync; None inside a
                                        # CUDA graph, where the block tables' width bounds the context
    window: int | None = None       # sliding-window size, None for full attention
    cu_seqlens: torch.Tensor | None = None  # [P + 1] query offsets of the prefilling sequences (from q[num_decode])

    def part(self, decode: bool) -> "AttnBatch":
        """The decoding or the prefilling sequences alone (slot_mapping is not needed after the write)."""
        n = self.num_decode
        cut = slice(None, n) if decode else slice(n, None)
        lens = None if self.context_lens_cpu is None else self.context_lens_cpu[cut]
        return AttnBatch(len(self.query_lens[cut]) if decode else 0, self.slot_mapping, self.block_tables[cut],
                         self.context_lens[cut], self.query_lens[cut], lens, self.window,
                         None if decode else self.cu_seqlens)

    def max_context(self, block_size: int) -> int:
        """The longest context, from the host copy or else the block tables' capacity."""
        if self.context_lens_cpu is None:
            return self.block_tables.shape[1] * block_size
        return max(self.context_lens_cpu)


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter this step's K/V ([T, kv_heads, head_dim]) into their cache slots."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """K or V of one or more sequences as contiguous [..., kv_heads, length, head_dim]."""
    block_table = block_table[..., :-(-length // cache.shape[1])]     # not the padding of longer sequences
    # index_select copies whole blocks; advanced indexing (cache[block_table]) is several times slower on CPU
    x = cache.index_select(0, block_table.flatten()).view(*block_table.shape, *cache.shape[1:])
    x = x.flatten(-4, -3)[..., :length, :, :]               # [..., tokens, kvh, hd]
    return x.transpose(-3, -2)


def paged_attention(q, k_cache, v_cache, batch: AttnBatch, scale: float, decode=None, prefill=None) -> torch.Tensor:
    """q: [T, heads, head_dim] for the new tokens; returns [T, heads, head_dim]. Decoding sequences are
    attended as one batch, prefilling ones by `prefill`; another backend passes its own two halves."""
    decode, prefill = decode or _decode, prefill or _prefill
    n, parts = batch.num_decode, []
    if n:
        parts.append(decode(q[:n], k_cache, v_cache, batch.part(decode=True), scale))
    if n < len(batch.query_lens):
        parts.append(prefill(q[n:], k_cache, v_cache, batch.part(decode=False), scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _decode(q, k_cache, v_cache, batch, scale):
    max_len = batch.max_context(k_cache.shape[1])
    k = gather_kv(k_cache, batch.block_tables, max_len)     # [B, kvh, S, hd]
    v = gather_kv(v_cache, batch.block_tables, max_len)
    mask = _mask(batch.context_lens - 1, torch.arange(max_len, device=q.device), batch.window)  # [B, S]
    if q.dtype == torch.float32:
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                             scale=scale, enable_gqa=True)
        return out.squeeze(2)
    # bf16/fp16: two batched GEMVs (query heads grouped per KV head) with a float32 softmax; the CPU's
    # masked SDPA kernel is about 10x slower for one query per sequence in these dtypes
    n, heads, dim = q.shape
    scores = torch.matmul(q.view(n, k.shape[1], -1, dim), k.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    return torch.matmul(probs.to(q.dtype), v).view(n, heads, dim)


def _prefill(q, k_cache, v_cache, batch, scale):
    outs, start = [], 0
    for i, (n_q, n_kv) in enumerate(zip(batch.query_lens, batch.context_lens_cpu)):
        qi = q[start:start + n_q].transpose(0, 1).unsqueeze(0)       # [1, heads, n_q, hd]
        k = gather_kv(k_cache, batch.block_tables[i], n_kv).unsqueeze(0)
        v = gather_kv(v_cache, batch.block_tables[i], n_kv).unsqueeze(0)
        if n_q == n_kv and batch.window is None:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(n_kv - n_q, n_kv, device=q.device)
            kv_pos = torch.arange(n_kv, device=q.device)
            mask = _mask(q_pos, kv_pos, batch.window)
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.squeeze(0).transpose(0, 1))
        start += n_q
    return torch.cat(outs)


def _mask(q_pos, kv_pos, window):
    """Boolean mask [..., q, kv]: causal (which also hides padding past a sequence's end) and windowed."""
    q_pos = q_pos[..., None]
    mask = kv_pos <= q_pos
    if window is not None:
        mask = mask & (kv_pos > q_pos - window)
    return mask
