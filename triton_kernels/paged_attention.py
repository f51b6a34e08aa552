"""Paged attention (Triton): the GPU twin of `padengine.layers.attention.paged_attention`.

The cache of one layer is K and V of shape [num_blocks, block_size, kv_heads, head_dim]; a sequence's
token p lives in block block_tables[seq, p // block_size], row p % block_size.

* Decode (one query per sequence): a program per (sequence, kv head, partition of the context) serves
  all the query heads of its group at once, so each K/V tile is read once per group. With several
  partitions (split-K) each writes its running max, sum and unnormalized output, and `_combine_kernel`
  merges them by log-sum-exp; partitions outside a sequence's context (or window) do no work.
* Prefill / chunked prefill: queries are flattened [T, heads, head_dim] with cu_seqlens; a sequence's
  queries are the last query_len positions of its context_len, so a cached prefix is attended to fully
  and the new tokens causally.

Scores are kept in base 2 (scale folded with log2 e) so the softmax uses exp2.
"""
import torch
import triton
import triton.language as tl

from padengine.layers.attention import paged_attention as torch_paged_attention

LOG2E = 1.4426950408889634
MAX_PARTITIONS = 64     # bounds the combine kernel's tile
NO_WINDOW = 1 << 30     # a window wider than any context, so full attention needs no branch


@triton.jit
def _load_kv(ptr, bt_row, pos, valid, kv_head, s_blk, s_slot, s_head, d, D: tl.constexpr,
             BLOCK_SIZE: tl.constexpr):
    """Rows [len(pos), D_PAD] of K or V at token positions `pos` of one sequence and kv head."""
    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    off = blk * s_blk + (pos % BLOCK_SIZE) * s_slot + kv_head * s_head
    return tl.load(ptr + off[:, None] + d[None, :], mask=valid[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, bt_row, pos, valid, see, kv_head, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, d,
                 m_i, l_i, acc, qk_scale, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step: fold the K/V tile at `pos` (loaded where `valid`, seen where `see`) into
    the running max m_i, sum l_i and output acc of the query rows q."""
    k = _load_kv(k_ptr, bt_row, pos, valid, kv_head, s_kb, s_ks, s_kh, d, D, BLOCK_SIZE)
    s = tl.where(see, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row may see nothing in this tile and nothing yet (a window, or past its causal end)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = _load_kv(v_ptr, bt_row, pos, valid, kv_head, s_vb, s_vs, s_vh, d, D, BLOCK_SIZE)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, qk_scale, window,
                   s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_bt, s_ot, s_oh, H,
                   GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PARTITION: tl.constexpr,
                   SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(len_ptr + seq)
    lo = tl.maximum(ctx - window, 0)
    begin = tl.maximum(part * PARTITION, lo)
    end = tl.minimum(ctx, (part + 1) * PARTITION)
    if begin < end:
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        heads = kv_head * GROUP + g
        hmask = g < GROUP
        q = tl.load(q_ptr + seq * s_qt + heads[:, None] * s_qh + d[None, :],
                    mask=hmask[:, None] & (d < D)[None, :], other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        bt_row = bt_ptr + seq * s_bt
        for t0 in range(begin, end, TILE):
            pos = t0 + tl.arange(0, TILE)
            valid = pos < end
            m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_row, pos, valid, valid[None, :], kv_head, s_kb, s_ks,
                                         s_kh, s_vb, s_vs, s_vh, d, m_i, l_i, acc, qk_scale, D, BLOCK_SIZE,
                                         PRECISION)
        dmask = hmask[:, None] & (d < D)[None, :]
        if SPLIT:
            row = (seq * H + heads) * tl.num_programs(2) + part
            tl.store(m_ptr + row, m_i, mask=hmask)
            tl.store(l_ptr + row, l_i, mask=hmask)
            tl.store(acc_ptr + row[:, None] * D_PAD + d[None, :], acc, mask=dmask)
        else:
            out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + seq * s_ot + heads[:, None] * s_oh + d[None, :], out, mask=dmask)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, len_ptr, out_ptr, window, s_ot, s_oh, H, n_parts,
                    D: tl.constexpr, D_PAD: tl.constexpr, PARTITION: tl.constexpr, P_PAD: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ctx = tl.load(len_ptr + seq)
    lo = tl.maximum(ctx - window, 0)
    p = tl.arange(0, P_PAD)
    used = (p >= lo // PARTITION) & (p * PARTITION < ctx)     # the partitions the decode kernel wrote
    row = (seq * H + head) * n_parts + p
    m = tl.load(m_ptr + row, mask=used, other=float("-inf"))
    scale = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(tl.load(l_ptr + row, mask=used, other=0.0) * scale, 0)
    d = tl.arange(0, D_PAD)
    acc = tl.load(acc_ptr + row[:, None] * D_PAD + d[None, :], mask=used[:, None], other=0.0)
    out = (tl.sum(acc * scale[:, None], 0) / total).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + seq * s_ot + head * s_oh + d, out, mask=d < D)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, len_ptr, out_ptr, qk_scale, window,
                    s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_bt, s_ot, s_oh,
                    GROUP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK_M
    head = tl.program_id(2)
    q_start = tl.load(cu_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    if first < q_len:
        ctx = tl.load(len_ptr + seq)
        rows = first + tl.arange(0, BLOCK_M)
        rmask = rows < q_len
        q_pos = ctx - q_len + tl.minimum(rows, q_len - 1)      # padding rows copy the last: none is empty
        d = tl.arange(0, D_PAD)
        dmask = rmask[:, None] & (d < D)[None, :]
        q = tl.load(q_ptr + (q_start + rows)[:, None] * s_qt + head * s_qh + d[None, :], mask=dmask,
                    other=0.0)
        kv_head = head // GROUP
        hi = tl.minimum(ctx, ctx - q_len + first + BLOCK_M)
        lo = tl.maximum(ctx - q_len + first - window + 1, 0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        bt_row = bt_ptr + seq * s_bt
        for t0 in range(lo, hi, BLOCK_N):
            pos = t0 + tl.arange(0, BLOCK_N)
            valid = pos < hi
            see = valid[None, :] & (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
            m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, bt_row, pos, valid, see, kv_head, s_kb, s_ks, s_kh, s_vb,
                                         s_vs, s_vh, d, m_i, l_i, acc, qk_scale, D, BLOCK_SIZE, PRECISION)
        out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + (q_start + rows)[:, None] * s_ot + head * s_oh + d[None, :], out, mask=dmask)


def _common(q, k_cache, v_cache, scale):
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    heads, kv_heads, head_dim = q.shape[1], k_cache.shape[2], q.shape[2]
    block_size = k_cache.shape[1]
    assert heads % kv_heads == 0 and block_size >= 16 and block_size & (block_size - 1) == 0
    precision = "ieee" if q.dtype == torch.float32 else "tf32"     # tf32 would be too coarse for fp32
    return (heads // kv_heads, triton.next_power_of_2(head_dim), scale * LOG2E, precision,
            k_cache.stride()[:3] + v_cache.stride()[:3])


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window=None,
                           max_context=None, partition_size=None, out=None):
    """q [B, heads, head_dim], one query per sequence at position context_len - 1. `max_context` (a
    host int; default the block tables' capacity, which never needs a sync) sizes the split-K grid."""
    batch, heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group, d_pad, qk_scale, precision, cache_strides = _common(q, k_cache, v_cache, scale)
    out = torch.empty_like(q) if out is None else out
    if max_context is None:
        max_context = block_tables.shape[1] * block_size
    if partition_size is None:
        partition_size = max(256, triton.next_power_of_2(triton.cdiv(max_context, MAX_PARTITIONS)))
    n_parts = triton.cdiv(max_context, partition_size)
    assert partition_size & (partition_size - 1) == 0
    split = n_parts > 1
    parts = torch.empty(batch * heads * n_parts if split else 1, dtype=torch.float32, device=q.device)
    l_parts = torch.empty_like(parts)
    acc = torch.empty(parts.numel(), d_pad if split else 1, dtype=torch.float32, device=q.device)
    window = window or NO_WINDOW
    _decode_kernel[(batch, kv_heads, n_parts)](
        q, k_cache, v_cache, block_tables, context_lens, out, parts, l_parts, acc, qk_scale, window,
        q.stride(0), q.stride(1), *cache_strides, block_tables.stride(0), out.stride(0), out.stride(1), heads,
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), D=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, TILE=min(64, partition_size), PARTITION=partition_size, SPLIT=split,
        PRECISION=precision, num_warps=8)
    if split:
        _combine_kernel[(batch, heads)](parts, l_parts, acc, context_lens, out, window, out.stride(0),
                                        out.stride(1), heads, n_parts, D=head_dim, D_PAD=d_pad,
                                        PARTITION=partition_size, P_PAD=triton.next_power_of_2(n_parts),
                                        num_warps=8)
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, max_query_len,
                            scale, window=None, out=None):
    """q [T, heads, head_dim] flattened over sequences; cu_seqlens [B + 1] (int32 or int64); sequence i's queries
    are the last (cu_seqlens[i+1] - cu_seqlens[i]) positions of its context_lens[i] tokens."""
    heads, head_dim = q.shape[1], q.shape[2]
    group, d_pad, qk_scale, precision, cache_strides = _common(q, k_cache, v_cache, scale)
    out = torch.empty_like(q) if out is None else out
    block_m = 64 if max_query_len > 32 else 16
    grid = (block_tables.shape[0], triton.cdiv(max_query_len, block_m), heads)
    _prefill_kernel[grid](q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, out, qk_scale,
                          window or NO_WINDOW, q.stride(0), q.stride(1), *cache_strides,
                          block_tables.stride(0), out.stride(0), out.stride(1), GROUP=group, D=head_dim,
                          D_PAD=d_pad, BLOCK_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=64,
                          PRECISION=precision, num_warps=8 if block_m == 64 else 4)
    return out


def paged_attention(q, k_cache, v_cache, batch, scale: float) -> torch.Tensor:
    """Drop-in for the torch `paged_attention`: same arguments (an `AttnBatch`), same result."""
    return torch_paged_attention(q, k_cache, v_cache, batch, scale, decode=_decode_part, prefill=_prefill_part)


def _decode_part(q, k_cache, v_cache, batch, scale):
    return paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale,
                                  batch.window, max_context=batch.max_context(k_cache.shape[1]))


def _prefill_part(q, k_cache, v_cache, batch, scale):
    return paged_prefill_attention(q, k_cache, v_cache, batch.block_tables, batch.cu_seqlens, batch.context_lens,
                                   max(batch.query_lens), scale, batch.window)
