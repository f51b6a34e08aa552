"""Continuous batching: which requests run in the next step, and preemption when KV blocks run out.

A step decodes one token for every running request and, in the same forward pass, prefills: first the
requests whose chunked prefill is under way, then requests admitted from the queue (new ones, or
preempted ones resuming). Prefill work stays within what decoding leaves of max_num_batched_tokens
(every stream's token counts; decoding itself is never cut): a prompt that does not fit is prefilled in
chunks over several steps, each stream up to its last token, and the step that computes the last tokens
of all of a request's streams samples its first token.
Running requests come first: when one cannot get a block, the most recently admitted request is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later (its
prefix blocks are usually still cached). Admission is first come, first served, bounded by
max_num_seqs, the token budget and free blocks in every pool a request needs.
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
        """The next step: running requests that decode one token, then the ones that prefill (a chunk,
        or all that is left; `Request.samples_this_step` tells which). Both kinds share one forward
        pass, so prefill work never stalls the running batch."""
        kept = []
        while self.running:
            req = self.running.popleft()
            if req.is_prefilling:
                kept.append(req)
                continue
            while not self._can_append(req):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(req)
                    break
            else:
                for s in req.streams:
                    self.pools[s.pool].append_slot(s)
                    s.step_end = len(s)
                kept.append(req)
        self.running.extend(kept)
        decode = [r for r in kept if not r.is_prefilling]
        budget = self.max_num_batched_tokens - sum(len(r.streams) for r in decode)
        prefill = []
        for req in (r for r in kept if r.is_prefilling):
            if budget <= 0:
                break
            budget -= self._chunk(req, budget)
            prefill.append(req)
        return decode, prefill + self._admit(budget)

    def _admit(self, budget: int) -> list[Request]:
        """Waiting requests, first come first served, while sequences, tokens and blocks last."""
        prefill = []
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if not self._can_allocate(req):
                break
            self.waiting.popleft()
            budget -= self._chunk(req, budget, allocate=True)
            req.status = Status.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.perf_counter()
                req.metrics.num_cached_tokens = req.base.num_cached_tokens
            self.running.append(req)
            prefill.append(req)
        return prefill

    def _chunk(self, req: Request, budget: int, allocate: bool = False) -> int:
        """Schedule the next part of req's prefill within `budget` tokens (set each stream's step_end)
        and publish the blocks it computes; returns the tokens used. Each stream stops short of its last
        token unless all the last tokens fit too (a request left with only its last tokens to compute
        takes the decode path next step)."""
        used = 0
        for s in req.streams:
            pool = self.pools[s.pool]
            if allocate:
                pool.allocate(s)        # stream by stream: a later stream may hit blocks published just now
            else:
                pool.rematch(s)
            take = max(0, min(len(s) - 1 - s.num_computed_tokens, budget - used))
            s.step_end = s.num_computed_tokens + take
            used += take
            pool.publish(s, s.step_end)
        if budget - used >= len(req.streams):
            for s in req.streams:
                s.step_end = len(s)
                self.pools[s.pool].publish(s, len(s))
            used += len(req.streams)
        return used

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
