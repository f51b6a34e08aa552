"""Engine-wide settings, validated on construction."""
import os
from dataclasses import dataclass

import torch

from padengine.errors import require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_BYTES = 2 << 30          # default KV budget on the CPU (both pools together)
GPU_KV_FRACTION = 0.85          # default KV budget on CUDA: this share of the memory free after loading


@dataclass
class EngineConfig:
    base_model: str
    reward_model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None       # blocks in each model's pool
    kv_cache_bytes: int | None = None      # or: a byte budget for all pools together
    max_num_seqs: int = 64                 # requests running at once
    max_num_batched_tokens: int | None = None  # tokens per step, decode and prefill
                                               # (default: max(8192, 2 * max_model_len))
    max_model_len: int | None = None       # prompt + generated tokens (default: the models' limit)
    seed: int = 0                          # seeds requests that carry none
    kernels: str = "torch"                 # "torch" (reference) or "triton" (fused sampler, paged attention)

    def __post_init__(self):
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            self.torch_device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: {e}") from e
        require(self.torch_device.type != "cuda" or torch.cuda.is_available(), "device", "CUDA is not available")
        for name in ("block_size", "max_num_seqs", "num_kv_blocks", "kv_cache_bytes", "max_model_len",
                     "max_num_batched_tokens"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, int) and value >= 1), name,
                    f"must be a positive integer, got {value!r}")
        require(self.num_kv_blocks is None or self.kv_cache_bytes is None, "num_kv_blocks",
                "give num_kv_blocks or kv_cache_bytes, not both")
        require(isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        require(self.kernels in ("torch", "triton"), "kernels", f"must be 'torch' or 'triton', got {self.kernels!r}")
        runnable = self.torch_device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        require(self.kernels == "torch" or runnable, "kernels",
                "Triton kernels need a CUDA device (or TRITON_INTERPRET=1, Triton's slow CPU interpreter)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
