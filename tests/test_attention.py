"""Paged attention (torch) against dense causal attention on contiguous K/V, float32 and bfloat16."""
import pytest
import torch

from padengine.layers.attention import AttnBatch, paged_attention, write_kv


def dense(q, k, v, q_pos, window, scale):
    """q [n, H, D] at positions q_pos attends to k, v [S, KVH, D] at positions 0..S-1."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    kv_pos = torch.arange(k.shape[0])
    mask = kv_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= kv_pos[None, :] > q_pos[:, None] - window
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("num_decode", [4, 0, 2])      # all decode, all prefill, mixed (decode rows first)
def test_paged_attention_matches_dense(dtype, tol, window, num_decode):
    torch.manual_seed(0)
    bs, heads, kv_heads, dim, blocks = 4, 6, 2, 16, 40
    lens = [13, 1, 22, 8]
    cached = [n - 1 for n in lens[:num_decode]] + [12, 0, 9, 5][num_decode:]   # prefill: a cached prefix or none
    k_cache = torch.randn(blocks, bs, kv_heads, dim).to(dtype)
    v_cache = torch.randn(blocks, bs, kv_heads, dim).to(dtype)
    perm, tables, start = torch.randperm(blocks).tolist(), [], 0
    for n in lens:
        tables.append(perm[start:start + -(-n // bs)])
        start += len(tables[-1])
    width = max(map(len, tables))
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q_lens = [n - c for n, c in zip(lens, cached)]
    pos = torch.cat([torch.arange(c, n) for c, n in zip(cached, lens)])
    owner = torch.cat([torch.full((q,), i) for i, q in enumerate(q_lens)])
    slots = table_t[owner, pos // bs] * bs + pos % bs
    q = torch.randn(len(pos), heads, dim).to(dtype)
    k_new, v_new = torch.randn(len(pos), kv_heads, dim).to(dtype), torch.randn(len(pos), kv_heads, dim).to(dtype)
    write_kv(k_cache, v_cache, k_new, v_new, slots)
    batch = AttnBatch(num_decode, slots, table_t, torch.tensor(lens), q_lens, lens, window)
    out = paged_attention(q, k_cache, v_cache, batch, scale=dim ** -0.5)
    start = 0
    for i, (n, nq) in enumerate(zip(lens, q_lens)):
        flat = lambda c: c[torch.tensor(tables[i])].flatten(0, 1)[:n]
        ref = dense(q[start:start + nq], flat(k_cache), flat(v_cache), torch.arange(n - nq, n), window, dim ** -0.5)
        err = (out[start:start + nq].float() - ref).norm() / ref.norm()
        assert err < tol, (i, err)
        start += nq
