"""The C++ CPU kernels (csrc/) against the torch layers they stand in for, on fresh random inputs: paged
attention (decode and prefill in one call, GQA ratios 1/3/4, block sizes 1/16/32, windows, ragged and
long split contexts), the KV write, the linear layers, RMSNorm, rotary and SiLU-and-multiply; and the
build-failure path.

The kernels are built on first use (once per machine; cached under $PADENGINE_CACHE/kernels). Tests that take
`cpu` run twice: on this CPU as it is, and as an AVX2-only one (`avx2_only`), where oneDNN refuses bfloat16.
"""
import logging
import re

import pytest
import torch

import csrc
from padengine import Engine
from padengine.config import EngineConfig
from padengine.errors import InvalidInput
from padengine.kernels import get_ops
from padengine.layers.activation import silu_and_mul
from padengine.layers.attention import AttnBatch, paged_attention, write_kv
from padengine.layers.norm import rms_norm
from padengine.layers.rotary import RotaryEmbedding, apply_rotary
from tests.test_attention import dense

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def cpp():
    return get_ops("cpp")


@pytest.fixture(params=["native", "avx2"])
def cpu(request, monkeypatch):
    """This CPU, or an AVX2-only one: oneDNN's bfloat16 check says no, and its weight reorder refuses
    bfloat16 with the error it raises there."""
    from csrc import ops
    if request.param == "avx2":
        reorder = torch.ops.mkldnn._reorder_linear_weight

        def refuse(weight, *args):
            if weight.dtype == torch.bfloat16:
                raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert "
                                   "or avx512bw, avx512vl and avx512dq")
            return reorder(weight, *args)

        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
        monkeypatch.setattr(ops, "PACKABLE", ops.packable_dtypes())
        assert ops.PACKABLE == {torch.float32}
    return request.param


def paged_case(dtype, heads, kv_heads, dim, block_size, ctx_lens, q_lens, window=None, seed=0):
    """A random KV pool and one step over it: sequence i ends the step with ctx_lens[i] tokens, the
    last q_lens[i] of them new (decoding sequences, one new token, first). The new K/V are written."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    need = [-(-n // block_size) for n in ctx_lens]
    k_cache, v_cache = rand(sum(need) + 3, block_size, kv_heads, dim), rand(sum(need) + 3, block_size, kv_heads, dim)
    perm, tables = torch.randperm(sum(need) + 3, generator=g).tolist(), []
    for n in need:
        tables.append(perm[:n])
        perm = perm[n:]
    table_t = torch.tensor([t + [0] * (max(need) - len(t)) for t in tables])
    pos = torch.cat([torch.arange(c - q, c) for c, q in zip(ctx_lens, q_lens)])
    owner = torch.cat([torch.full((q,), i) for i, q in enumerate(q_lens)])
    slots = table_t[owner, pos // block_size] * block_size + pos % block_size
    write_kv(k_cache, v_cache, rand(len(pos), kv_heads, dim), rand(len(pos), kv_heads, dim), slots)
    num_decode = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
    batch = AttnBatch(num_decode, slots, table_t, torch.tensor(ctx_lens), list(q_lens), list(ctx_lens), window)
    return rand(len(pos), heads, dim), k_cache, v_cache, batch, tables


def check_attention(cpp, dtype, heads, kv_heads, dim, block_size, ctx_lens, q_lens, window=None):
    q, k_cache, v_cache, batch, tables = paged_case(dtype, heads, kv_heads, dim, block_size, ctx_lens, q_lens, window)
    out = cpp.attention(q, k_cache, v_cache, batch, dim ** -0.5)
    ref = paged_attention(q, k_cache, v_cache, batch, dim ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    start = 0
    for i, (n, nq) in enumerate(zip(ctx_lens, q_lens)):
        flat = lambda c: c[torch.tensor(tables[i])].flatten(0, 1)[:n]
        exact = dense(q[start:start + nq], flat(k_cache), flat(v_cache), torch.arange(n - nq, n), window, dim ** -0.5)
        rows = slice(start, start + nq)
        assert (out[rows].float() - exact).norm() / exact.norm() < TOL[dtype], i
        assert (out[rows].float() - ref[rows].float()).norm() / exact.norm() < 2 * TOL[dtype], i
        start += nq


RAGGED_CTX = [1, 37, 70, 5, 40, 90, 16]
RAGGED_Q = [1, 1, 1, 5, 40, 20, 1]      # 3 decoding; prefills whole, after a cached prefix, of one token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_attention_matches_torch(cpp, dtype, heads, kv_heads, block_size, window):
    check_attention(cpp, dtype, heads, kv_heads, 32, block_size, RAGGED_CTX, RAGGED_Q, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_attention_long_contexts_and_odd_head_dim(cpp, dtype):
    """One decoding sequence over 3000 tokens (split over context chunks), a 300-token prefill after a
    700-token prefix (many query tiles), head_dim 24 (Qwen3's test shape, no vector width divides it)."""
    check_attention(cpp, dtype, 9, 3, 64, 16, [3000], [1])
    check_attention(cpp, dtype, 8, 2, 32, 32, [3000, 5], [1, 1], window=500)
    check_attention(cpp, dtype, 8, 2, 24, 16, [3000, 1000], [1, 300], window=500)


def test_write_kv_matches_torch(cpp):
    torch.manual_seed(0)
    qkv = torch.randn(9, 6 + 2 * 2, 16)
    k, v = qkv[:, 6:8], qkv[:, 8:]                  # strided views, as the model passes them
    caches = [torch.randn(12, 4, 2, 16) for _ in range(2)]
    slots = torch.randperm(48)[:9]
    expected = [c.clone() for c in caches]
    write_kv(*expected, k, v, slots)
    cpp.write_kv(*caches, k, v, slots)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpp.write_kv(*caches, k, v, slots + 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch_and_follows_weight_changes(cpp, cpu, dtype, bias):
    """Row counts on both sides of csrc.ops.GEMV_ROWS (float32 products that small stay F.linear, the rest
    are packed; bfloat16 where this CPU packs it), and a weight changed in place, which is packed again."""
    from csrc import ops
    torch.manual_seed(4)
    weight = (0.1 * torch.randn(40, 24)).to(dtype)
    b = (0.1 * torch.randn(40)).to(dtype) if bias else None
    packed_now = lambda: ops._packed.get(weight, (None,))[0] == weight._version
    for _ in range(2):
        for rows in (1, 2, 3, 16):
            x = torch.randn(rows, 24).to(dtype)
            torch.testing.assert_close(cpp.linear(x, weight, b), torch.nn.functional.linear(x, weight, b),
                                       atol=TOL[dtype], rtol=TOL[dtype])
            assert packed_now() == (dtype in ops.PACKABLE and (dtype != torch.float32 or rows > ops.GEMV_ROWS))
        weight.mul_(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,q_lens,first", [(False, [1], True), (False, [1, 1, 6], False), (True, [1, 3], False)])
def test_fused_decoder_layer_is_the_layer_op_by_op(cpp, cpu, dtype, bias, q_lens, first):
    """The whole-layer native call against the same layer's modules run one op at a time (the fused path
    turned off): the same outputs, residual and cache, bit for bit, on one row (F.linear's side of
    GEMV_ROWS) and on decode + prefill steps (packed matmuls), with and without biases and a residual."""
    from padengine.distributed.parallel import Shard
    from padengine.models.llama import DecoderLayer, ModelConfig
    cfg = ModelConfig("llama", 64, 64, 96, 1, 4, 2, 16, 1e-5, 10000.0, None, 64, False, bias, bias, bias, None)
    torch.manual_seed(7)
    layer = DecoderLayer(cfg, RotaryEmbedding(16, 64, 10000.0, None, cpp.rotary), cpp, Shard()).to(dtype)
    layer.self_attn.rope.build()        # the float32 tables again, as the loader leaves them
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    assert layer.fused is cpp.decoder_layer
    ctx_lens = [9 + 4 * i for i in range(len(q_lens))]
    _, k_cache, v_cache, batch, _ = paged_case(dtype, 4, 2, 16, 4, ctx_lens, q_lens)
    positions = torch.cat([torch.arange(c - q, c) for c, q in zip(ctx_lens, q_lens)])
    x = torch.randn(len(positions), 64).to(dtype)
    residual = None if first else torch.randn(len(positions), 64).to(dtype)
    outs = []
    for fused in (cpp.decoder_layer, None):
        layer.fused = fused
        caches = k_cache.clone(), v_cache.clone()
        layer.self_attn.k_cache, layer.self_attn.v_cache = caches
        with torch.inference_mode():
            outs.append((*layer(x, residual, positions, batch), *caches))
    for got, want in zip(*outs):
        assert torch.equal(got, want)


def test_bfloat16_engine_equals_the_torch_op_set(llama, persrm, tokenizer, cpu):
    """A bfloat16 engine on the C++ kernels (packed matmuls where this CPU packs bfloat16) gives the torch
    op set's tokens."""
    from tests.helpers import random_batch
    base, reward, params = random_batch(len(tokenizer), n=6, seed=60)
    outs = [Engine(llama, persrm, dtype="bfloat16", kernels=k, block_size=4).generate(
        prompt_token_ids=base, reward_prompt_token_ids=reward, params=params) for k in ("cpp", "torch")]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch(cpp, dtype):
    torch.manual_seed(1)
    x, residual = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype)
    weight = (1 + 0.3 * torch.randn(96)).to(dtype)
    out, res = cpp.rms_norm(x, weight, 1e-5, residual)
    ref, ref_res = rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(res, ref_res)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    plain, same = cpp.rms_norm(x, weight, 1e-5)
    assert same is x
    torch.testing.assert_close(plain, rms_norm(x, weight, 1e-5)[0], atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [1536, 37])
def test_silu_and_mul_matches_torch(cpp, dtype, inter):
    """A width no vector divides too, and gates far out in both tails (exp's clamps)."""
    torch.manual_seed(2)
    x = (4 * torch.randn(5, 2, 2 * inter)).to(dtype)
    x[0, 0, :4] = torch.tensor([-120.0, -90.0, 90.0, 120.0]).to(dtype)
    out = cpp.silu_and_mul(x[:, 1])                 # a strided view, as a slice of a batch would be
    assert out.shape == (5, inter) and out.dtype == dtype
    torch.testing.assert_close(out, silu_and_mul(x[:, 1]), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(cpp.silu_and_mul(x[0, 0:1]), silu_and_mul(x[0, 0:1]), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 24])
def test_rotary_matches_torch_in_place(cpp, dtype, head_dim):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    rope = RotaryEmbedding(head_dim, 512, 500000.0, scaling)
    qkv = torch.randn(11, 6 + 2 * 2, head_dim).to(dtype)
    q, k = qkv[:, :6], qkv[:, 6:8]
    positions = torch.randint(0, 512, (11,))
    eq, ek = apply_rotary(positions, q, k, rope.cos, rope.sin)
    v_before = qkv[:, 8:].clone()
    oq, ok = cpp.rotary(positions, q, k, rope.cos, rope.sin)
    assert oq.data_ptr() == q.data_ptr() and torch.equal(qkv[:, 8:], v_before)
    torch.testing.assert_close(oq, eq, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ok, ek, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("compiler, why", [("no-such-c++", "no C.. compiler: 'no-such-c..' is not found"),
                                           ("/bin/false", "the build failed")])
def test_bad_compiler_falls_back_to_torch_with_one_logged_line(monkeypatch, tmp_path, caplog, compiler, why):
    """A fresh cache and a compiler that is missing or fails: auto picks torch and says why once; asking
    for "cpp" is an InvalidInput naming `kernels`. Nothing crashes."""
    monkeypatch.setattr(csrc, "_state", {})
    monkeypatch.setenv("PADENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", compiler)
    with caplog.at_level(logging.WARNING):       # (any logger: cpp_extension's notes must stay quiet too)
        assert EngineConfig("unused", kernels="auto").kernels == "torch"
        assert EngineConfig("unused").kernels == "torch"
        with pytest.raises(InvalidInput, match="kernels: the C.. CPU kernels are unavailable"):
            EngineConfig("unused", kernels="cpp")
    assert len(caplog.records) == 1 and caplog.records[0].name == "csrc", [r.getMessage() for r in caplog.records]
    message = caplog.records[0].getMessage()
    assert "unavailable" in message and "\n" not in message and re.search(why, message), message
    assert not list(tmp_path.glob("kernels/*/*.so"))
