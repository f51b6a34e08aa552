"""AsyncEngine: the engine behind asyncio callers.

One background thread owns the Engine and drives the scheduler; callers never touch it. They hand
requests and aborts over through a locked inbox, and receive their StreamOutputs on an asyncio queue
(via call_soon_threadsafe), one queue per call: a prompt's params.n choices, or a batch of prompts, come
interleaved through one async iterator. Torch releases the GIL during the model step, so the event loop keeps
serving while the engine computes. Leaving an `async for` early (a client that disconnects, a
cancelled task) aborts the request, whose KV blocks are freed before the next step.
"""
import asyncio
import logging
import threading
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator

from padengine.engine.llm_engine import Engine
from padengine.engine.sequence import Request
from padengine.engine.detokenizer import IncrementalDetokenizer, StreamOutput
from padengine.serving.metrics import Stats

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts (`max_queue`)."""


@dataclass
class _Stream:
    req: Request
    detok: IncrementalDetokenizer
    queue: asyncio.Queue                 # shared by the requests of one `stream` call
    loop: asyncio.AbstractEventLoop
    index: int = 0                       # position in that call's batch


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int | None = None):
        self.engine, self.max_queue = engine, max_queue
        self.stats = Stats(engine)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[_Stream] = []
        self._aborts: list[int] = []
        self._streams: dict[int, _Stream] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="padengine-loop", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | None = None, params=None, *, preference=None,
                       prompt_token_ids: list[int] | None = None, reward_prompt_token_ids=None,
                       stop: list[str] | None = None) -> AsyncIterator[StreamOutput]:
        """Stream one prompt: its params.n choices, interleaved (`StreamOutput.choice`). Raises InvalidInput
        for bad input and QueueFull when the queue is full, both before anything is queued."""
        async with aclosing(self.stream(
                None if prompt is None else [prompt], params, preferences=None if preference is None else [preference],
                prompt_token_ids=None if prompt_token_ids is None else [prompt_token_ids],
                reward_prompt_token_ids=None if reward_prompt_token_ids is None else [reward_prompt_token_ids],
                stop=stop)) as outputs:
            async for out in outputs:
                yield out

    async def stream(self, prompts: list[str] | None = None, params=None, *, preferences=None,
                     prompt_token_ids: list[list[int]] | None = None, reward_prompt_token_ids=None,
                     stop: list[str] | None = None) -> AsyncIterator[StreamOutput]:
        """Like `Engine.stream`: every request of a batch (params.n per prompt, prompt-major), their outputs
        interleaved as they come; `StreamOutput.index` is the request's position in that order (prompt * n +
        choice when every prompt has the same n). It ends when all have finished; leaving early aborts all
        the unfinished ones. Raises InvalidInput / QueueFull before anything is queued."""
        reqs = self.engine.inputs.make_requests(prompts, params, preferences, prompt_token_ids,
                                                reward_prompt_token_ids)
        queue, loop = asyncio.Queue(), asyncio.get_running_loop()
        streams = [_Stream(req, IncrementalDetokenizer(self.engine.tokenizer, stop), queue, loop, i)
                   for i, req in enumerate(reqs)]
        with self._lock:
            if self.max_queue is not None and self.num_waiting() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._inbox.extend(streams)
        self._wake.set()
        pending = {req.request_id for req in reqs}
        try:
            while pending:
                out = await queue.get()
                if out.finished:
                    pending.discard(out.request_id)
                yield out
        finally:
            for rid in pending:
                self.abort(rid)

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._inbox)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopped:
            self._take_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                advanced = self.engine.step()
                self.stats.step(advanced)
            except Exception:                    # a bug must not hang every caller: fail them all
                logger.exception("engine step failed; aborting all requests")
                advanced = [s.req for s in self._streams.values()]
                for req in advanced:
                    self.engine.abort(req)
            for req in advanced:
                if req.request_id in self._streams:
                    self._send(self._streams[req.request_id])

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for stream in inbox:
            self._streams[stream.req.request_id] = stream
            self.engine.scheduler.add(stream.req)
        for rid in aborts:
            if rid in self._streams:
                req = self._streams.pop(rid).req
                self.engine.abort(req)
                self.stats.finish(req)

    def _send(self, stream: _Stream) -> None:
        try:
            out = self.engine.stream_output(stream.detok, stream.req, stream.index)
            if out.text or out.token_ids or out.finished:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        except Exception:                        # e.g. the caller's event loop has closed: drop that caller
            logger.exception("cannot deliver request %d; aborting it", stream.req.request_id)
            out = None
            self.engine.abort(stream.req)
        if out is None or out.finished:
            self._streams.pop(stream.req.request_id, None)
            self.stats.finish(stream.req)
