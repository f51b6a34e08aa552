"""The Triton RMSNorm (residual add fused), rotary embedding and SiLU-and-multiply against the torch
layers they replace.

Without CUDA the kernels run in Triton's interpreter (switched on before triton is imported), on small
shapes; `gpu` tests use Llama-3-8B widths in bf16. Inputs are fresh random values each run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import triton_kernels  # noqa: E402
from padengine.layers.activation import silu_and_mul  # noqa: E402
from padengine.layers.norm import rms_norm  # noqa: E402
from padengine.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_rms_norm(tokens, hidden, dtype):
    x = torch.randn(tokens, hidden, device=DEV).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
    residual = torch.randn(tokens, hidden, device=DEV).to(dtype)
    expected, expected_res = rms_norm(x, weight, 1e-5, residual.clone())
    out, res = triton_kernels.rms_norm(x, weight, 1e-5, residual)
    assert res.data_ptr() == residual.data_ptr() and torch.equal(res, expected_res)     # updated in place
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=TOL[dtype])
    plain, same = triton_kernels.rms_norm(x, weight, 1e-5)
    assert same is x
    torch.testing.assert_close(plain, rms_norm(x, weight, 1e-5)[0], atol=TOL[dtype], rtol=TOL[dtype])


def check_rotary(tokens, heads, kv_heads, head_dim, dtype, scaling=None):
    rope = RotaryEmbedding(head_dim, 512, 500000.0, scaling).to(DEV)
    rope.build()
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=DEV).to(dtype)
    q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]            # strided views, as in the model
    positions = torch.randint(0, 512, (tokens,), device=DEV)
    eq, ek = apply_rotary(positions, q.float(), k.float(), rope.cos, rope.sin)
    v_before = qkv[:, heads + kv_heads:].clone()
    oq, ok = triton_kernels.apply_rotary(positions, q, k, rope.cos, rope.sin)
    assert oq.data_ptr() == q.data_ptr() and torch.equal(qkv[:, heads + kv_heads:], v_before)  # V untouched
    torch.testing.assert_close(oq.float(), eq, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ok.float(), ek, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_matches_torch(hidden, dtype):
    check_rms_norm(5, hidden, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_torch(dtype):
    """GQA (6 query heads, 2 kv heads, neither a power of two for the query), llama3 scaling."""
    check_rotary(7, 6, 2, 32, dtype, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


def check_silu_and_mul(tokens, inter, dtype):
    x = (torch.randn(tokens, 2 * inter, device=DEV) * 3).to(dtype)
    torch.testing.assert_close(triton_kernels.silu_and_mul(x), silu_and_mul(x), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul_matches_torch(dtype):
    """An intermediate size that is not a multiple of the kernel's block (two blocks, the last partial)."""
    check_silu_and_mul(3, 1100, dtype)


@pytest.mark.gpu
@cuda_only
def test_gpu_llama_widths_bf16():
    check_rms_norm(300, 4096, torch.bfloat16)
    check_rotary(300, 32, 8, 128, torch.bfloat16)
    check_silu_and_mul(300, 14336, torch.bfloat16)
