"""Continuous batching: which requests run in the next step, and preemption when KV blocks run out.

A step decodes one token for every running request and, in the same forward pass, prefills requests
admitted from the queue (new ones, or preempted ones resuming). Running requests come first: when one
cannot get a block, the most recently admitted request is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed later (its prefix blocks are usually still cached).
Admission is first come, first served, bounded by max_num_seqs, max_num_batched_tokens (decode tokens
count too) and free blocks in every pool a request needs.
"""
import logging
import time
from collections import deque

from padengine.engine.block_manager import BlockManager
from padengine.engine.sequence import Request, Status

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, pools: list[BlockManager], max_num_seqs: int, max_num_batched_tokens: int):
        self.pools = pools
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Request], list[Request]]:
        """The next step: running requests that decode one token, then newly admitted ones to prefill.
        Both kinds share one forward pass, so admitting work never stalls the running batch."""
        decode = []
        while self.running:
            req = self.running.popleft()
            while not self._can_append(req):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(req)
                    break
            else:
                for s in req.streams:
                    self.pools[s.pool].append_slot(s)
                decode.append(req)
        self.running.extend(decode)
        return decode, self._admit(tokens=len(decode))

    def _admit(self, tokens: int) -> list[Request]:
        """Waiting requests, first come first served, while sequences, tokens and blocks last (one is
        always admitted when blocks allow, so a long prompt never waits for the running batch to drain)."""
        prefill = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            need = sum(len(s) for s in req.streams)
            if (prefill and tokens + need > self.max_num_batched_tokens) or not self._can_allocate(req):
                break
            self.waiting.popleft()
            for s in req.streams:
                self.pools[s.pool].allocate(s)
            req.status = Status.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.perf_counter()
                req.metrics.num_cached_tokens = req.base.num_cached_tokens
            self.running.append(req)
            prefill.append(req)
            tokens += need
        return prefill

    def preempt(self, req: Request) -> None:
        logger.debug("preempting request %d after %d tokens", req.request_id, len(req.output_ids))
        self._release(req)
        req.status = Status.WAITING
        req.metrics.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Free a finished or aborted request's blocks and drop it from the queues."""
        self._release(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _release(self, req: Request) -> None:
        for s in req.streams:
            self.pools[s.pool].release(s)

    def _can_allocate(self, req: Request) -> bool:
        need = [0] * len(self.pools)
        for s in req.streams:
            need[s.pool] += self.pools[s.pool].blocks_needed(len(s))
        return all(n <= pool.num_free for n, pool in zip(need, self.pools))

    def _can_append(self, req: Request) -> bool:
        need = [0] * len(self.pools)
        for s in req.streams:
            need[s.pool] += self.pools[s.pool].needs_block(s)
        return all(n <= pool.num_free for n, pool in zip(need, self.pools))
