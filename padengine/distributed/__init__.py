"""Beyond one device: where each model lives (placement), models split across ranks (parallel), the PAD
sampler over a split vocabulary (sampler) and the worker processes that hold the other ranks (workers)."""
