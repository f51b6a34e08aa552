"""A step's results, device to host: packed into one tensor, copied without blocking, read when needed.

`Readback.start` packs the sampled rows' token ids, log-probabilities, alternatives and base-model
log-probabilities into one float64 tensor (token ids are exact in float64) and queues its copy into a
pinned host buffer behind the step, recording an event; `collect` waits for that event and turns the rows
into `TokenResult`s. Two pinned buffers alternate, so the asynchronous loop can queue step t+1's copy
while step t's results are still unread. On the CPU the copy is the packed tensor itself.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch

from padengine.engine.step_inputs import StepResult


class TokenResult(NamedTuple):
    """One request's token of a step, on the host."""
    token: int
    logprob: float
    top: list[tuple[int, float]]       # alternatives by log-probability, most likely first
    base_logprob: float | None


@dataclass
class Pending:
    """A launched step's results on their way to the host."""
    host: torch.Tensor                 # [rows, 2 + 2 * width (+ 1)] float64, valid once `done` is
    done: "torch.cuda.Event | None"
    width: int                         # alternatives per row
    has_base: bool


class Readback:
    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.float64)] * 2
        self.turn = 0

    def start(self, result: StepResult, n: int) -> Pending:
        """Queue the copy of the first n rows of `result` (the requests; the rest is padding)."""
        s = result.sample
        parts = [s.tokens[:n, None], s.logprobs[:n, None], s.top_ids[:n], s.top_logprobs[:n]]
        if result.base_logprobs is not None:
            parts.append(result.base_logprobs[:n, None])
        packed = torch.cat([p.double() for p in parts], dim=1)
        width, has_base = s.top_ids.shape[1], result.base_logprobs is not None
        if self.device.type != "cuda":
            return Pending(packed, None, width, has_base)
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
    def collect(pending: Pending) -> list[TokenResult]:
        if pending.done is not None:
            pending.done.synchronize()
        width, out = pending.width, []
        if not width and not pending.has_base:
            return [TokenResult(int(token), logprob, [], None) for token, logprob in pending.host.tolist()]
        for row in pending.host.tolist():
            ids, lps = row[2:2 + width], row[2 + width:2 + 2 * width]
            top = sorted(((int(i), lp) for i, lp in zip(ids, lps) if lp != float("-inf")), key=lambda p: -p[1])
            out.append(TokenResult(int(row[0]), row[1], top, row[-1] if pending.has_base else None))
        return out
