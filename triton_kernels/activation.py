"""SiLU-and-multiply (Triton): the GPU twin of `padengine.layers.activation.silu_and_mul`.

The MLP's fused gate/up projection gives [T, 2 * I]; one launch computes silu(gate) * up (the SiLU in
float32, rounded to the model dtype before the product, as torch does) instead of two.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, s_x, s_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * s_x + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * s_o + cols, act * up, mask=mask)


def silu_and_mul(x):
    """x [T, 2 * I] (gate, then up) -> silu(gate) * up [T, I]."""
    assert x.stride(-1) == 1
    tokens, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if tokens:
        _silu_and_mul_kernel[(tokens, triton.cdiv(n, BLOCK))](x, out, x.stride(0), out.stride(0), n, BLOCK=BLOCK,
                                                              num_warps=4)
    return out
