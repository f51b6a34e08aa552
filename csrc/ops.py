"""The C++ CPU kernels (`torch.ops.padengine.*`, built by `csrc.load`) behind the torch references'
signatures: the "cpp" op set of `padengine.kernels`. Each function adapts the engine's arguments (an
AttnBatch, an optional residual, a Sample) and leaves the work to one op.

Its `linear` is not ours: oneDNN's matmul on a weight reordered once into oneDNN's blocked layout (what
inductor's frozen CPU linear runs), measured 1.03-2.1x faster than torch's default for a layer's float32
matmuls from 4 rows up (`benchmarks/cpu_kernels.py --only ops` and `--only linear`), and kept per weight
until the weight changes; float32 products of one or two rows stay torch's matrix-vector path, which is
faster there. Which dtypes are packed is decided once, from this CPU (`PACKABLE`): oneDNN's bfloat16
path needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT and refuses to run on an AVX2-only CPU, where bfloat16
weights stay F.linear's.
"""
import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from padengine.layers.attention import AttnBatch
from padengine.layers.sampler import Sample

_ops = torch.ops.padengine
_packed = WeakIdKeyDictionary()         # weight -> (its version when packed, the packed weight)
GEMV_ROWS = 2


def packable_dtypes() -> frozenset:
    """The weight dtypes oneDNN packs on this CPU: float32 wherever oneDNN runs, bfloat16 where its bf16
    path does (torch asks the CPU the same question before it would refuse); never float16, whose path
    needs AVX-512 FP16, which no machine of this project's has to test it on."""
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    return frozenset([torch.float32] + [torch.bfloat16] * torch.ops.mkldnn._is_mkldnn_bf16_supported())


PACKABLE = packable_dtypes()


def linear(x, weight, bias=None):
    """As F.linear: the packed matmul, except float32 products of at most GEMV_ROWS rows, where torch's
    matrix-vector path measured 1.2-2x faster on a layer's weights (`benchmarks/cpu_kernels.py --only
    linear`; bfloat16 is faster packed at every row count)."""
    return packed_linear(x, weight, bias, gemv=True)


def packed_linear(x, weight, bias=None, gemv=False):
    """As F.linear, through oneDNN's matmul on the weight reordered once (again when it changes in place);
    `gemv`: except float32 products of at most GEMV_ROWS rows (`packed_weight`)."""
    packed = packed_weight(weight, x if gemv else None)
    return F.linear(x, weight, bias) if packed is None else torch.ops.mkldnn._linear_pointwise(
        x, packed, bias, "none", [], "")


def packed_weight(weight, x=None):
    """The weight in oneDNN's blocked layout (packed once, kept until it changes), or None where F.linear
    is the faster or the only way: a dtype oneDNN cannot pack here, or (given the input `x`) float32
    products of at most GEMV_ROWS rows."""
    if weight.dtype not in PACKABLE:
        return None
    if x is not None and weight.dtype == torch.float32 and x.numel() <= GEMV_ROWS * x.shape[-1]:
        return None
    entry = _packed.get(weight)
    if entry is None or entry[0] != weight._version:
        entry = _packed[weight] = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16))
    return entry[1]


def decoder_layer(layer, x, residual, positions, batch: AttnBatch):
    """As `layer.forward` through this op set's modules (a layer without q/k norms, on one rank), in one
    native call: no Python between its ops."""
    a, m = layer.self_attn, layer.mlp
    projs = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
    return tuple(_ops.decoder_layer(
        x, residual, positions, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
        layer.input_layernorm.eps, [p.weight for p in projs], [packed_weight(p.weight, x) for p in projs],
        [p.bias for p in projs], a.qkv_proj.shards[:2], a.rope.cos, a.rope.sin, a.k_cache, a.v_cache,
        batch.slot_mapping, batch.block_tables, batch.context_lens, batch.query_lens, batch.window, a.scale))


def paged_attention(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """As `padengine.layers.attention.paged_attention`: decoding and prefilling sequences in one call,
    K/V read from the pool through the block tables."""
    return _ops.paged_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, batch.query_lens,
                                batch.window, scale)


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    _ops.write_kv(k_cache, v_cache, k, v, slot_mapping)


def rms_norm(x, weight, eps: float, residual=None):
    """As `padengine.layers.norm.rms_norm`: (normed, residual), the residual add fused."""
    if residual is None:
        return _ops.rms_norm(x, weight, eps), x
    return tuple(_ops.add_rms_norm(x, residual, weight, eps))


def silu_and_mul(x):
    """As `padengine.layers.activation.silu_and_mul` (the C++ op leaves bfloat16 and float16 to torch)."""
    return _ops.silu_and_mul(x)


def apply_rotary(positions, q, k, cos, sin):
    """As `padengine.layers.rotary.apply_rotary`, but in place (q and k come back rotated)."""
    _ops.rotary_(q, k, positions, cos, sin)
    return q, k


def pad_sample(base_logits, reward_logits, top_k, weight, temperature, seed, position, top_p=None, min_p=None,
               max_k=None, num_top=0) -> Sample:
    """As `padengine.layers.sampler.pad_sample` (alternatives come back in order, -inf where fewer survive)."""
    return Sample(*_ops.pad_sample(base_logits, reward_logits, top_k, weight, temperature, seed, position, top_p,
                                   min_p, max_k, num_top))
