"""Engine-wide settings, validated on construction."""
import os
from dataclasses import dataclass

import torch

from padengine.errors import InvalidInput, require, require_int
from padengine.kernels import cpp_unavailable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_BYTES = 2 << 30          # default KV budget on the CPU (both pools together)
GPU_KV_FRACTION = 0.85          # default KV budget on CUDA: this share of the memory free after loading
DEFAULT_BATCHED_TOKENS = 8192   # tokens per step (longer prompts are prefilled in chunks)
KERNELS = ("auto", "torch", "triton", "flash", "cpp")


def flash_attn_available() -> bool:
    """flash_attn imports (not merely installed: a build for another torch fails on import)."""
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@dataclass
class EngineConfig:
    base_model: str
    reward_model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int | None = None          # tokens per KV block (default 16; 256 with flash-attn)
    num_kv_blocks: int | None = None       # blocks in each model's pool
    kv_cache_bytes: int | None = None      # or: a byte budget for all pools together
    max_num_seqs: int = 64                 # requests running at once
    max_num_batched_tokens: int | None = None  # tokens per step, decode and prefill; longer prompts are
                                               # prefilled in chunks (default: DEFAULT_BATCHED_TOKENS)
    max_model_len: int | None = None       # prompt + generated tokens (default: the models' limit)
    seed: int = 0                          # seeds requests that carry none
    kernels: str = "auto"                  # "torch" (the reference), "triton" (fused sampler, paged
                                           # attention), "flash" (Triton, with flash-attn's attention) or
                                           # "cpp" (C++ CPU kernels, built on first use); auto: on CUDA
                                           # flash for fp16/bf16 if flash_attn imports, else triton; on the
                                           # CPU cpp if it builds, else torch (one logged line says why)
    cuda_graphs: bool | None = None        # decode steps in CUDA graphs (default: on CUDA); True on the CPU
                                           # runs the same padded static-buffer steps uncaptured (for tests)
    async_scheduling: bool | None = None   # schedule and launch step t+1 before reading step t's tokens
                                           # (default: on CUDA); the synchronous loop is the reference
    tensor_parallel_size: int = 1          # ranks each model is split across, one process each (rank 0
                                           # is this one; on CUDA rank r uses device index + r)
    reward_device: str | None = None       # the reward model on a device and process of its own (after
                                           # the base's ranks); per step only candidates cross
    worker_timeout: float = 300.0          # seconds the engine waits on another rank in a collective (a
                                           # step, loading) before it gives up; starting gets at least 300

    @property
    def multi_process(self) -> bool:
        return self.tensor_parallel_size > 1 or self.reward_device is not None

    def __post_init__(self):
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            self.torch_device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise InvalidInput("device", str(e)) from e
        cuda = self.torch_device.type == "cuda"
        require(not cuda or torch.cuda.is_available(), "device", "CUDA is not available")
        if cuda and self.torch_device.index is None:     # torch.cuda.set_device needs an index
            self.torch_device = torch.device("cuda", torch.cuda.current_device())
        require(self.kernels in KERNELS, "kernels", f"must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.kernels == "auto":      # flash-attn takes fp16/bf16 only
            flash = self.dtype != "float32" and flash_attn_available()
            self.kernels = ("flash" if flash else "triton") if cuda else (
                "cpp" if cpp_unavailable() is None else "torch")
        if self.block_size is None:
            self.block_size = 256 if self.kernels == "flash" else 16
        require_int(self.tensor_parallel_size, "tensor_parallel_size")
        require(self.tensor_parallel_size >= 1, "tensor_parallel_size",
                f"must be a positive integer, got {self.tensor_parallel_size!r}")
        self._check_devices(cuda)
        if self.cuda_graphs is None:
            self.cuda_graphs = cuda and not self.multi_process
        if self.async_scheduling is None:
            self.async_scheduling = cuda and not self.multi_process
        for name in ("block_size", "max_num_seqs", "num_kv_blocks", "kv_cache_bytes", "max_model_len",
                     "max_num_batched_tokens"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, int) and value >= 1), name,
                    f"must be a positive integer, got {value!r}")
        require(self.num_kv_blocks is None or self.kv_cache_bytes is None, "num_kv_blocks",
                "give num_kv_blocks or kv_cache_bytes, not both")
        require(isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        for name in ("cuda_graphs", "async_scheduling"):
            require(isinstance(getattr(self, name), bool), name, f"must be a bool or None, got {getattr(self, name)!r}")
        runnable = cuda or os.environ.get("TRITON_INTERPRET") == "1"
        require(self.kernels in ("torch", "cpp") or runnable, "kernels",
                "Triton kernels need a CUDA device (or TRITON_INTERPRET=1, Triton's slow CPU interpreter)")
        require(self.kernels != "cpp" or not cuda, "kernels", "'cpp' kernels run on the CPU only")
        if self.kernels == "cpp":
            reason = cpp_unavailable()
            require(reason is None, "kernels", f"the C++ CPU kernels are unavailable here: {reason}")
        require(self.kernels != "flash" or (cuda and flash_attn_available()), "kernels",
                "'flash' needs a CUDA device and the flash_attn package")
        require(self.kernels != "flash" or self.dtype != "float32", "kernels",
                "flash-attn computes in float16 or bfloat16 only: pick one as dtype, or kernels='triton'")
        require(self.kernels != "flash" or self.block_size % 256 == 0, "block_size",
                f"flash-attn's paged KV cache needs a multiple of 256, got {self.block_size}")

    def _check_devices(self, cuda: bool) -> None:
        """Every rank's device exists; all ranks on one kind (NCCL on CUDA, gloo on the CPU)."""
        self.reward_torch_device = None
        if self.reward_device is not None:
            try:
                self.reward_torch_device = torch.device(self.reward_device)
            except (RuntimeError, TypeError) as e:
                raise InvalidInput("reward_device", str(e)) from e
            require(self.reward_torch_device.type == self.torch_device.type, "reward_device",
                    f"must be a {self.torch_device.type} device, as `device` is (one communication backend)")
            if cuda and self.reward_torch_device.index is None:     # as `device`: the current one
                self.reward_torch_device = torch.device("cuda", torch.cuda.current_device())
        if cuda and self.multi_process:
            needed = [self.torch_device.index + self.tensor_parallel_size - 1]
            if self.reward_torch_device is not None:
                needed.append(self.reward_torch_device.index)
                first = self.torch_device.index
                require(not first <= needed[1] <= needed[0], "reward_device",      # NCCL: one rank per GPU
                        f"{self.reward_torch_device} is one of the base model's (cuda:{first} to cuda:{needed[0]})")
            require(max(needed) < torch.cuda.device_count(), "tensor_parallel_size",
                    f"needs device cuda:{max(needed)}, but {torch.cuda.device_count()} CUDA devices are visible")
        require(isinstance(self.worker_timeout, (int, float)) and self.worker_timeout > 0, "worker_timeout",
                f"must be a positive number of seconds, got {self.worker_timeout!r}")
        if self.multi_process:
            require(not self.cuda_graphs, "cuda_graphs", "are not supported with several processes "
                    "(tensor_parallel_size > 1 or reward_device): leave it unset")
            require(not self.async_scheduling, "async_scheduling", "is not supported with several "
                    "processes (tensor_parallel_size > 1 or reward_device): leave it unset")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
