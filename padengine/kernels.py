"""Kernel backends by name: each `kernels=` choice is one `Ops`, the op set a model takes when it is built
(linear layers, attention, KV write, RMSNorm, rotary, activation) and the runner samples with.

Every op keeps its torch reference's signature; "torch" is `padengine.layers` itself, the reference every
other set is tested against. "triton" and "flash" are `triton_kernels` (flash with flash-attn's attention),
"cpp" is `csrc` (C++ CPU kernels, built once per machine, with oneDNN's prepacked matmuls). A set is
loaded the first time it is named.
"""
from dataclasses import dataclass, replace
from functools import cache
from typing import Callable


@dataclass(frozen=True)
class Ops:
    linear: Callable         # (x, weight, bias) -> x @ weight.T + bias                  F.linear
    attention: Callable      # (q, k_cache, v_cache, batch: AttnBatch, scale) -> out      layers/attention.py
    write_kv: Callable       # (k_cache, v_cache, k, v, slot_mapping) -> None            layers/attention.py
    rms_norm: Callable       # (x, weight, eps, residual=None) -> (normed, residual)     layers/norm.py
    rotary: Callable         # (positions, q, k, cos, sin) -> (q, k)                     layers/rotary.py
    silu_and_mul: Callable   # (x [T, 2I]) -> [T, I]                                      layers/activation.py
    sample: Callable         # pad_sample(...) -> Sample                                  layers/sampler.py
    # (layer, x, residual, positions, batch) -> (out, residual): a whole decoder layer without q/k norms on
    # one rank, as its modules with the ops above; None: the modules run op by op
    decoder_layer: Callable | None = None


def _torch() -> Ops:
    from torch.nn.functional import linear

    from padengine.layers.activation import silu_and_mul
    from padengine.layers.attention import paged_attention, write_kv
    from padengine.layers.norm import rms_norm
    from padengine.layers.rotary import apply_rotary
    from padengine.layers.sampler import pad_sample
    return Ops(linear, paged_attention, write_kv, rms_norm, apply_rotary, silu_and_mul, pad_sample)


def _triton() -> Ops:
    import triton_kernels as tk
    from torch.nn.functional import linear
    return Ops(linear, tk.paged_attention, tk.write_kv, tk.rms_norm, tk.apply_rotary, tk.silu_and_mul, tk.pad_sample)


def _flash() -> Ops:
    from padengine.layers.flash_attention import paged_attention
    return replace(_triton(), attention=paged_attention)


def _cpp() -> Ops:
    import csrc
    csrc.load()
    from csrc import ops
    return Ops(ops.linear, ops.paged_attention, ops.write_kv, ops.rms_norm, ops.apply_rotary, ops.silu_and_mul,
               ops.pad_sample, ops.decoder_layer)


BACKENDS = {"torch": _torch, "triton": _triton, "flash": _flash, "cpp": _cpp}


@cache
def get_ops(name: str) -> Ops:
    """The op set `name` (one of BACKENDS); "cpp" raises csrc.NativeUnavailable where it cannot build."""
    return BACKENDS[name]()


def cpp_unavailable() -> str | None:
    """Why the C++ CPU kernels cannot run here, or None when they can (building them on first call)."""
    try:
        import csrc
    except ImportError as e:        # an install that left the package out
        return f"the csrc package does not import: {e}"
    try:
        csrc.load()
    except csrc.NativeUnavailable as e:
        return str(e)
    return None
