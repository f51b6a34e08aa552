"""A step's transfers: its inputs up to the device, its results back to the host.

`Uploader` copies a step's two host arrays (executor/step.py) to the device, one copy each, through a
reused pinned staging buffer per dtype on CUDA.

`Readback.start` packs the sampled rows' token ids, log-probabilities, alternatives and base-model
log-probabilities into one float64 tensor (token ids are exact in float64) and queues its copy into a
pinned host buffer behind the step, recording an event; `collect` waits for that event and turns the
columns into lists (`StepTokens`). Two pinned buffers alternate, so the asynchronous loop can queue step
t+1's copy while step t's results are still unread. On the CPU the results are on the host already: no
packing, `collect` reads their tensors (copied first where they are a graph's static outputs, which the
next replay overwrites before an asynchronous loop reads them; on CUDA the queued copy comes first).
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from padengine.executor.step import StepResult


class Uploader:
    """Host arrays to device tensors, one copy each; on CUDA through a pinned buffer per dtype, reused:
    before refilling one, the host waits for the event recorded after its last copy (a step that
    samples nothing ends without reading results, so nothing else guarantees that copy is done)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.staging: dict[torch.dtype, torch.Tensor] = {}
        self.copied: dict[torch.dtype, torch.cuda.Event] = {}

    def __call__(self, values: np.ndarray, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.device.type == "cpu":
            if out is not None and out.data_ptr() == values.ctypes.data:
                return out          # out is values' own memory (a persistent step's arrays)
            host = torch.from_numpy(values)
            return host if out is None else out.copy_(host)
        host = torch.from_numpy(values)
        if dtype in self.copied:
            self.copied[dtype].synchronize()
        staging = self.staging.get(dtype)
        if staging is None or staging.numel() < host.numel():
            staging = self.staging[dtype] = torch.empty(max(host.numel(), 4096) * 2, dtype=dtype, pin_memory=True)
        staging[:host.numel()].copy_(host)
        out = torch.empty(host.numel(), dtype=dtype, device=self.device) if out is None else out
        out.copy_(staging[:host.numel()], non_blocking=True)
        self.copied.setdefault(dtype, torch.cuda.Event()).record()
        return out


class StepTokens(NamedTuple):
    """A step's tokens on the host, one entry per sampled request in order."""
    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None     # alternatives by log-probability, most likely first
    base_logprobs: list[float] | None


@dataclass
class Pending:
    """A launched step's results on their way to the host."""
    host: torch.Tensor | None          # on CUDA: [rows, 2 + 2 * width (+ 1)] float64, valid once `done` is
    done: "torch.cuda.Event | None"
    width: int                         # alternatives per row
    has_base: bool
    parts: list[torch.Tensor] | None = None    # on the CPU: the rows' tensors themselves


def pack(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """The rows' parts side by side in one float64 tensor (token ids are exact in float64)."""
    return torch.cat([p.double().view(n, -1) for p in parts], dim=1)


class Readback:
    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.float64)] * 2
        self.turn = 0

    def start(self, result: StepResult, n: int, static: bool = False) -> Pending:
        """Queue the copy of the first n rows of `result` (the requests; the rest is padding). `static`:
        the result is a graph's outputs, overwritten by its next replay."""
        s = result.sample
        parts = [s.tokens, s.logprobs, s.top_ids, s.top_logprobs]
        if result.base_logprobs is not None:
            parts.append(result.base_logprobs)
        if len(s.tokens) != n:
            parts = [p[:n] for p in parts]
        width, has_base = s.top_ids.shape[1], result.base_logprobs is not None
        if not self.on_cuda:
            return Pending(None, None, width, has_base, [p.clone() for p in parts] if static else parts)
        packed = pack(parts, n)
        self.turn ^= 1
        buf = self.buffers[self.turn]
        if buf.numel() < packed.numel():
            buf = self.buffers[self.turn] = torch.empty(max(packed.numel(), 1 << 12) * 2, dtype=torch.float64,
                                                        pin_memory=True)
        host = buf[:packed.numel()].view(packed.shape)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Pending(host, done, width, has_base)

    @staticmethod
    def collect(pending: Pending) -> StepTokens:
        width, parts = pending.width, pending.parts
        if parts is None:
            if pending.done is not None:
                pending.done.synchronize()
            columns = pending.host.t()
            parts = [columns[0].long(), columns[1], columns[2:2 + width].t(), columns[2 + width:2 + 2 * width].t(),
                     columns[-1]]
        top = base = None
        if width:
            top = [sorted(((i, lp) for i, lp in zip(ids, lps) if lp != float("-inf")), key=lambda p: -p[1])
                   for ids, lps in zip(parts[2].long().tolist(), parts[3].tolist())]
        if pending.has_base:
            base = parts[4].tolist()
        return StepTokens(parts[0].tolist(), parts[1].tolist(), top, base)
