"""Triton kernels for the GPU path (fused PAD sampler, paged attention, KV-cache write).

The engine runs without them: every kernel has a torch reference in `padengine.layers`, which the CPU
path uses and the kernels are tested against.

Each public function takes its reference's arguments, so the GPU path swaps them one for one:
`pad_sample` (as `padengine.layers.sampler.pad_sample`, plus an optional `out=` buffer for the token
ids), `paged_attention` (an `AttnBatch`, as `padengine.layers.attention.paged_attention`) and `write_kv`.
`rms_norm` (as `padengine.layers.norm.rms_norm`, residual add fused), `silu_and_mul` (as
`padengine.layers.activation.silu_and_mul`) and `apply_rotary` (as `padengine.layers.rotary.apply_rotary`, in
place). `paged_decode_attention` and `paged_prefill_attention` are the two halves of `paged_attention` on
plain tensors. Without CUDA the kernels run only in Triton's interpreter, which TRITON_INTERPRET=1 switches on
if it is set before triton is first imported.
"""
from triton_kernels.activation import silu_and_mul
from triton_kernels.kv_write import write_kv
from triton_kernels.pad_sample import pad_sample
from triton_kernels.paged_attention import paged_attention, paged_decode_attention, paged_prefill_attention
from triton_kernels.rms_norm import rms_norm
from triton_kernels.rotary import apply_rotary

__all__ = ["apply_rotary", "pad_sample", "paged_attention", "paged_decode_attention", "paged_prefill_attention",
           "rms_norm", "silu_and_mul", "write_kv"]
