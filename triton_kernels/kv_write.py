"""KV-cache write (Triton): the GPU twin of `padengine.layers.attention.write_kv`.

One program per new token copies its K and V ([kv_heads, head_dim]) into cache slot slot_mapping[t] of
caches shaped [num_blocks, block_size, kv_heads, head_dim]. K and V may be strided views (slices of a
fused qkv projection) and the caches views into a larger pool. A negative slot skips the token, so a
batch padded for a CUDA graph can point its padding anywhere harmless.
"""
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, s_kt, s_kh, s_vt, s_vh,
                     s_kcb, s_kcs, s_kch, s_vcb, s_vcs, s_vch, KV_HEADS: tl.constexpr, D: tl.constexpr,
                     H_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, H_PAD)[:, None]
        d = tl.arange(0, D_PAD)[None, :]
        mask = (h < KV_HEADS) & (d < D)
        blk, row = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k = tl.load(k_ptr + t * s_kt + h * s_kh + d, mask=mask)
        tl.store(kc_ptr + blk * s_kcb + row * s_kcs + h * s_kch + d, k, mask=mask)
        v = tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=mask)
        tl.store(vc_ptr + blk * s_vcb + row * s_vcs + h * s_vch + d, v, mask=mask)


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter this step's K/V ([T, kv_heads, head_dim]) into their cache slots."""
    assert k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    _write_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                                v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], KV_HEADS=kv_heads,
                                D=head_dim, H_PAD=triton.next_power_of_2(kv_heads),
                                D_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1])
