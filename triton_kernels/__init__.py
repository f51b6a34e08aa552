"""Triton kernels for the GPU path (fused PAD sampler, paged attention, KV-cache write).

The engine runs without them: every kernel has a torch reference in `padengine.layers`, which the CPU
path uses and the kernels are tested against.
"""
