"""The flash-attn backend's calls, checked on the CPU against the torch paged attention through a
stand-in `flash_attn` module: a dense torch implementation of the two documented functions (int32
tables and lengths, paged K/V [num_blocks, block_size >= 256, kv_heads, head_dim], causal masks aligned
to the end of each context, (left, right) windows). It checks how padengine calls flash-attn, not
flash-attn itself; on a GPU with flash_attn installed, tests/test_gpu_engine.py runs the real one."""
import importlib
import sys
import types
from dataclasses import replace

import pytest
import torch

from padengine.config import flash_attn_available
from padengine.layers.attention import AttnBatch, paged_attention


def _attend(q, k, v, scale, window):
    """q [Lq, H, D] are the last Lq positions of k, v [Lk, Hk, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    see = (k_pos <= q_pos) & ((k_pos >= q_pos - window[0]) if window[0] >= 0 else True)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    p = torch.softmax(s.masked_fill(~see, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)


def _pages(cache, table, n):
    assert table.dtype == torch.int32 and cache.shape[1] % 256 == 0
    return cache[table.long()].flatten(0, 1)[:n]


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size):
    assert causal and cache_seqlens.dtype == torch.int32 and q.dim() == 4
    lens = cache_seqlens.tolist()
    return torch.stack([_attend(q[b], _pages(k_cache, block_table[b], n), _pages(v_cache, block_table[b], n),
                                softmax_scale, window_size) for b, n in enumerate(lens)])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           causal, window_size, block_table):
    assert causal and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        assert lq <= max_seqlen_q and lk <= max_seqlen_k
        outs.append(_attend(q[cq[b]:cq[b + 1]], _pages(k, block_table[b], lk), _pages(v, block_table[b], lk),
                            softmax_scale, window_size))
    return torch.cat(outs)


@pytest.fixture
def flash(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache, module.flash_attn_varlen_func = flash_attn_with_kvcache, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.delitem(sys.modules, "padengine.layers.flash_attention", raising=False)
    return importlib.import_module("padengine.layers.flash_attention")


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("static", [False, True])
def test_flash_backend_matches_torch(flash, window, static):
    """Three decoding sequences and two prefills (a fresh prompt, a chunk after a cached prefix) in
    one batch, blocks of 256; `static`: no host context lengths, as inside a CUDA graph."""
    torch.manual_seed(0)
    bs, heads, kv_heads, dim = 256, 4, 2, 16
    lens, query_lens = [5, 300, 700, 300, 530], [1, 1, 1, 300, 20]
    per_seq = [-(-n // bs) for n in lens]
    k_cache = torch.randn(sum(per_seq) + 2, bs, kv_heads, dim)
    v_cache = torch.randn_like(k_cache)
    owned = torch.randperm(len(k_cache)).split(per_seq + [2])
    tables = torch.zeros(len(lens), max(per_seq) + 1, dtype=torch.long)
    for i, blocks in enumerate(owned[:-1]):
        tables[i, :len(blocks)] = blocks
    q = torch.randn(sum(query_lens), heads, dim)
    batch = AttnBatch(3, torch.empty(0, dtype=torch.long), tables, torch.tensor(lens), query_lens, lens, window,
                      torch.tensor([0, 300, 320]))
    expected = paged_attention(q, k_cache, v_cache, batch, dim ** -0.5)
    out = flash.paged_attention(q, k_cache, v_cache, replace(batch, context_lens_cpu=None) if static else batch,
                                dim ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()), reason="needs CUDA and flash_attn")
@pytest.mark.parametrize("window", [None, 1000])
@pytest.mark.parametrize("static", [False, True])
def test_gpu_real_flash_matches_torch(window, static):
    """bf16 at Llama-3 head shapes, blocks of 256, against the torch attention on the same inputs in fp32."""
    sys.modules.pop("padengine.layers.flash_attention", None)      # bound to the stand-in by the tests above
    flash = importlib.import_module("padengine.layers.flash_attention")
    bs, heads, kv_heads, dim = 256, 32, 8, 128
    lens, query_lens = [1, 700, 3000, 1500, 2100], [1, 1, 1, 1500, 37]
    per_seq = [-(-n // bs) for n in lens]
    k_cache = torch.randn(sum(per_seq) + 2, bs, kv_heads, dim, device="cuda").bfloat16()
    v_cache = torch.randn_like(k_cache)
    owned = torch.randperm(len(k_cache), device="cuda").split(per_seq + [2])
    tables = torch.zeros(len(lens), max(per_seq) + 1, dtype=torch.long, device="cuda")
    for i, blocks in enumerate(owned[:-1]):
        tables[i, :len(blocks)] = blocks
    q = torch.randn(sum(query_lens), heads, dim, device="cuda").bfloat16()
    batch = AttnBatch(3, torch.empty(0, dtype=torch.long, device="cuda"), tables, torch.tensor(lens, device="cuda"),
                      query_lens, lens, window, torch.tensor([0, 1500, 1537], device="cuda"))
    expected = paged_attention(q.float(), k_cache.float(), v_cache.float(), batch, dim ** -0.5)
    out = flash.paged_attention(q, k_cache, v_cache, replace(batch, context_lens_cpu=None) if static else batch,
                                dim ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)

