"""RMSNorm with the residual add fused in (Triton): the GPU twin of `padengine.layers.norm.rms_norm`.

One program per row: optionally x + residual (in the model dtype, written back as the new residual),
then x * rsqrt(mean(x^2) + eps) in float32, rounded to the model dtype and scaled by the weight, as
transformers' Llama does. One launch replaces the eight small ones of the torch layer.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, s_x, s_r, s_o, n, eps, HAS_RESIDUAL: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * s_r + cols, mask=mask, other=0.0)
        tl.store(res_ptr + row * s_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    y = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * s_o + cols, w * y, mask=mask)


def rms_norm(x, weight, eps, residual=None):
    """x [T, hidden]; returns (normed, residual): with `residual`, x + residual is normed and becomes
    the new residual (updated in place); without, x itself is the residual."""
    assert x.stride(-1) == 1 and weight.stride(-1) == 1
    out = torch.empty_like(x)
    if x.shape[0]:
        res = residual if residual is not None else x
        assert res.stride(-1) == 1
        block = triton.next_power_of_2(x.shape[-1])
        _rms_norm_kernel[(x.shape[0],)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), x.shape[-1],
                                        eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                        num_warps=max(1, min(16, block // 256)))
    return out, (residual if residual is not None else x)
