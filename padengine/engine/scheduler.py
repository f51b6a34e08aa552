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
max_num_seqs, the token budget and free blocks in every pool a request needs. The n choices of one
prompt form a group: admitted together (the first one's published prompt blocks serve the others, so
the prompt is prefilled once) and preempted together.

A step's life: `schedule` -> the runner launches it -> `commit` (its KV counts as computed, each sampled
request holds a PENDING token) -> the runner collects its results -> `postprocess` (tokens appended,
stops checked, finished requests freed); `rollback` if the launch fails. The synchronous loop collects
each step right after launching it; the asynchronous one schedules and launches step t+1 first, so a
request may be scheduled with its last token still PENDING (the device feeds it) and is dropped one step
late when that token ends it. A preempted request resumes only once its pending token has been read.
"""
import logging
import time
from collections import deque
from itertools import repeat

from padengine.engine.block_manager import BlockManager
from padengine.engine.sequence import Batch, Request, Status
from padengine.executor.transfer import StepTokens

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

    def schedule(self) -> Batch:
        """The next step: running requests that decode one token, then the ones that prefill. Both kinds
        share one forward pass, so prefill work never stalls the running batch. A request whose pending
        token is sure to be its last (max_tokens) sits the step out."""
        kept, decode, chunking, pools, bs = [], [], [], self.pools, self.pools[0].block_size
        preempted = False
        while self.running:         # the hot loop: one pass per running request, no per-token work
            req = self.running.popleft()
            kept.append(req)
            if not req.decodes:
                chunking.append(req)    # its chunked prefill goes on
                continue
            if req.num_drawn >= req.params.max_tokens:
                continue                # its pending token is its last
            for s in req.streams:
                if len(s.token_ids) > len(s.block_table) * bs:     # its last token starts a block
                    while req.status == Status.RUNNING and not self._can_append(req):
                        self.preempt(self.running[-1] if self.running else req, kept)
                        preempted = True
                    if req.status == Status.RUNNING:                # not preempted with its group
                        for t in req.streams:
                            pools[t.pool].append_slot(t)
                    break
            if req.status == Status.RUNNING:
                decode.append(req)
        self.running.extend(kept)
        if preempted:               # a later victim's group may have been scheduled
            decode = [r for r in decode if r.status == Status.RUNNING]
        budget = self.max_num_batched_tokens - sum(len(r.streams) for r in decode)
        prefill = []
        for req in (r for r in chunking if r.status == Status.RUNNING):
            if budget <= 0:
                break
            budget -= self._chunk(req, budget)
            prefill.append(req)
        prefill += self._admit(budget)
        return Batch(decode, prefill, decode + [r for r in prefill if r.samples_this_step])

    def commit(self, batch: Batch) -> None:
        """The step is launched: its streams' KV is (being) written, and each sampled request holds a
        PENDING token until `postprocess` reads it."""
        decoded = len(batch.decode)     # the first rows: one pass over their streams does both
        for row, req in enumerate(batch.sampled):
            req.reserve(row, row < decoded)
        for req in batch.prefill:
            for s in req.streams:
                s.num_computed_tokens = s.step_end
        for req in batch.prefill:
            req.decodes = not req.is_prefilling

    def postprocess(self, batch: Batch, results: StepTokens) -> list[Request]:
        """A step's results (one per sampled request, in order) into its requests; finished ones are
        freed. Requests that ended while the step was in flight (an abort, a stop string, a stop token
        drawn by the step before) drop their token. Returns the requests that got one."""
        advanced = []
        none = repeat(None)
        for req, token, logprob, top, base in zip(batch.sampled, results.tokens, results.logprobs,
                                                  results.top or none, results.base_logprobs or none):
            if req.status == Status.FINISHED:
                continue
            req.fill(token, logprob, top, base)
            if req.status == Status.FINISHED:
                self.finish(req)
            advanced.append(req)
        return advanced

    def rollback(self, batch: Batch) -> None:
        """A step failed to launch: its prefilling requests go back to the queue, to recompute from what the
        cache really holds (a stream may count blocks another one published for this step as computed),
        and the blocks published for it leave the prefix cache, since their KV was never written."""
        for req in batch.prefill:
            for s in req.streams:
                self.pools[s.pool].forget(s)
        for req in reversed(batch.prefill):
            if req.status == Status.RUNNING:      # not already sent back with its group
                self.preempt(req)

    def _admit(self, budget: int) -> list[Request]:
        """Waiting requests, first come first served, while sequences, tokens and blocks last."""
        prefill = []
        while self.waiting and budget > 0 and not self.waiting[0].num_pending:
            group = [r for r in self.waiting[0].group if r.status == Status.WAITING]
            if len(self.running) + len(group) > self.max_num_seqs or not self._can_allocate(group):
                break
            for req in group:       # a group is admitted whole: its later choices hit the first's blocks
                self.waiting.remove(req)
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

    def preempt(self, req: Request, scheduled: list[Request] | None = None) -> None:
        """Free req's blocks and put it back at the front of the queue, with the running requests of its
        group (taken out of `scheduled` too, this step's decode list so far), which resume together."""
        group = [r for r in req.group if r.status == Status.RUNNING]
        for r in reversed(group):
            logger.debug("preempting request %d after %d tokens", r.request_id, len(r.output_ids))
            for queue in (self.running, scheduled or []):
                if r in queue:
                    queue.remove(r)
            self._release(r)
            r.status = Status.WAITING
            r.metrics.num_preemptions += 1
            self.waiting.appendleft(r)

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
        req.decodes = False

    def _can_allocate(self, group: list[Request]) -> bool:
        """Room for every stream of the group without counting on the prefix cache."""
        need = [0] * len(self.pools)
        for s in (s for req in group for s in req.streams):
            need[s.pool] += self.pools[s.pool].blocks_needed(len(s))
        return all(n <= pool.num_free for n, pool in zip(need, self.pools))

    def _can_append(self, req: Request) -> bool:
        need = [0] * len(self.pools)
        for s in req.streams:
            need[s.pool] += self.pools[s.pool].needs_block(s)
        return all(n <= pool.num_free for n, pool in zip(need, self.pools))
