"""Rotary position embedding applied in place (Triton): the GPU twin of `padengine.layers.rotary.apply_rotary`.

One program per token rotates all query and key heads of that token (strided views into the fused qkv
output) with the float32 cos/sin rows of its position: one launch for the dozen small ones of the torch
layer. Non-interleaved (rotate-half) layout, as Llama checkpoints in transformers use.
"""
import triton
import triton.language as tl


@triton.jit
def _rotate(ptr, s_h, cos, sin, d, HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr):
    h = tl.arange(0, H_PAD)[:, None]
    mask = (h < HEADS) & (d < HALF)[None, :]
    lo = ptr + h * s_h + d[None, :]
    x1 = tl.load(lo, mask=mask, other=0.0)
    x2 = tl.load(lo + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(lo, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(lo + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, s_qt, s_qh, s_kt, s_kh, s_c, HEADS: tl.constexpr,
                   KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, KV_PAD: tl.constexpr, HALF: tl.constexpr,
                   HALF_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + pos * s_c + d, mask=d < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * s_c + d, mask=d < HALF, other=0.0)[None, :]
    _rotate(q_ptr + t * s_qt, s_qh, cos, sin, d, HEADS, H_PAD, HALF)
    _rotate(k_ptr + t * s_kt, s_kh, cos, sin, d, KV_HEADS, KV_PAD, HALF)


def apply_rotary(positions, q, k, cos, sin):
    """q [T, heads, head_dim], k [T, kv_heads, head_dim] (rotated in place and returned); cos, sin
    [max_len, head_dim] float32 tables whose two halves repeat."""
    assert q.stride(-1) == k.stride(-1) == 1 and cos.stride(-1) == sin.stride(-1) == 1
    tokens, heads, head_dim = q.shape
    if tokens:
        _rotary_kernel[(tokens,)](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                  cos.stride(0), HEADS=heads, KV_HEADS=k.shape[1],
                                  H_PAD=triton.next_power_of_2(heads), KV_PAD=triton.next_power_of_2(k.shape[1]),
                                  HALF=head_dim // 2, HALF_PAD=triton.next_power_of_2(head_dim // 2))
    return q, k
