"""The Triton paged attention and KV-cache write against the torch references in padengine.layers.

Without CUDA the kernels run in Triton's interpreter (switched on before triton is imported) with short
contexts. The interpreter's tl.dot multiplies bf16 bit patterns as integers (triton-lang/triton#11584),
so bf16 attention is covered by the `gpu` tests only; fp32 and fp16 run everywhere.
"""
import os
from dataclasses import replace
from itertools import accumulate

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import triton_kernels  # noqa: E402
from padengine.layers.attention import AttnBatch, paged_attention, write_kv  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def setup(context_lens, query_lens, block_size, heads, kv_heads, head_dim, dtype, window=None):
    """Random caches, queries and an AttnBatch whose sequences own scattered blocks (tables padded with
    a spare column); a decode batch when every query_len is None."""
    per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=DEV).to(dtype)
    v_cache = torch.randn_like(k_cache)
    owned = torch.randperm(num_blocks, device=DEV).split(per_seq + [3])
    tables = torch.zeros(len(context_lens), max(per_seq) + 1, dtype=torch.int32, device=DEV)
    for i, blocks in enumerate(owned[:-1]):
        tables[i, :len(blocks)] = blocks
    decode = all(q is None for q in query_lens)
    lens = [1] * len(context_lens) if decode else query_lens
    q = torch.randn(sum(lens), heads, head_dim, device=DEV).to(dtype)
    cu = torch.tensor([0, *accumulate(lens)], dtype=torch.int32, device=DEV)
    batch = AttnBatch(len(context_lens) if decode else 0, torch.empty(0, dtype=torch.long, device=DEV), tables,
                      torch.tensor(context_lens, device=DEV), lens, list(context_lens), window, cu)
    return q, k_cache, v_cache, batch


def reference(q, k_cache, v_cache, batch):
    """The torch attention in fp32 on the same (rounded) inputs."""
    return paged_attention(q.float(), k_cache.float(), v_cache.float(), batch, q.shape[-1] ** -0.5)


def close(out, expected):
    atol = 1e-5 if out.dtype == torch.float32 else 3e-3 if out.dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_torch(block_size, window, dtype):
    """GQA (8 query heads on 2 kv heads), one partition per sequence and split-K over partitions of 32
    (up to 5 per sequence, merged by log-sum-exp). Without host context lengths (as in a CUDA graph)
    both backends size their work by the block tables' capacity and give the same result."""
    q, k_cache, v_cache, batch = setup([1, 37, 100, 130], [None] * 4, block_size, 8, 2, 32, dtype, window)
    expected = reference(q, k_cache, v_cache, batch)
    close(triton_kernels.paged_attention(q, k_cache, v_cache, batch, 32 ** -0.5), expected)
    static = replace(batch, context_lens_cpu=None)
    close(triton_kernels.paged_attention(q, k_cache, v_cache, static, 32 ** -0.5), expected)
    close(reference(q, k_cache, v_cache, static), expected)
    split = triton_kernels.paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                                  32 ** -0.5, window, partition_size=32)
    close(split, expected)


def test_decode_without_grouping_and_odd_head_dim():
    q, k_cache, v_cache, batch = setup([9, 70], [None] * 2, 16, 4, 4, 40, torch.float32)
    out = triton_kernels.paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                                40 ** -0.5, partition_size=32)
    close(out, reference(q, k_cache, v_cache, batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_matches_torch(block_size, window, dtype):
    """A fresh 70-token prompt (two query tiles), chunked prefills after a cached prefix, and a
    one-token chunk, flattened in one batch."""
    q, k_cache, v_cache, batch = setup([70, 37, 100, 130], [70, 5, 1, 33], block_size, 8, 2, 32, dtype,
                                       window)
    close(triton_kernels.paged_attention(q, k_cache, v_cache, batch, 32 ** -0.5),
          reference(q, k_cache, v_cache, batch))


@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_matches_torch(block_size):
    """K and V are strided slices of a fused qkv output; a negative slot is skipped."""
    tokens, heads, kv_heads, head_dim = 9, 4, 2, 24
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=DEV)
    k, v = qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    k_cache = torch.randn(6, block_size, kv_heads, head_dim, device=DEV)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(6 * block_size, device=DEV)[:tokens]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(k_ref, v_ref, k[1:], v[1:], slots[1:])
    slots[0] = -1
    triton_kernels.write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("window", [None, 4096])
def test_gpu_llama_shapes(window):
    """bf16, 32 query heads on 8 kv heads of 128, blocks of 16: decode over contexts up to 9000 (split-K)
    and a prefill batch of a fresh prompt and chunks after cached prefixes."""
    lens = [1, 15, 16, 17, 700, 2049, 5000, 9000]
    q, k_cache, v_cache, batch = setup(lens, [None] * len(lens), 16, 32, 8, 128, torch.bfloat16, window)
    close(triton_kernels.paged_attention(q, k_cache, v_cache, batch, 128 ** -0.5),
          reference(q, k_cache, v_cache, batch))
    q, k_cache, v_cache, batch = setup([1000, 4500, 300, 64], [1000, 512, 1, 64], 16, 32, 8, 128,
                                       torch.bfloat16, window)
    close(triton_kernels.paged_attention(q, k_cache, v_cache, batch, 128 ** -0.5),
          reference(q, k_cache, v_cache, batch))


@pytest.mark.gpu
@cuda_only
def test_gpu_write_kv_bf16():
    k = torch.randn(300, 8, 128, device=DEV).bfloat16()
    v = torch.randn_like(k)
    k_cache = torch.zeros(64, 16, 8, 128, device=DEV).bfloat16()
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(64 * 16, device=DEV)[:300]
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(k_ref, v_ref, k, v, slots)
    triton_kernels.write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
