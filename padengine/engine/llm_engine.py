"""The Engine: the public entry point. It has its inputs turned into requests (engine/inputs.py), feeds
them to the scheduler, runs each scheduled batch on the executor (padengine/executor/: launch, collect)
and returns outputs. The host side (this folder) owns the requests and the KV blocks' bookkeeping; the
executor owns everything on the device.
"""
import gc
import logging
from typing import Iterator

import torch
from tqdm import tqdm

from padengine.config import EngineConfig
from padengine.engine.block_manager import BlockManager
from padengine.engine.scheduler import Scheduler
from padengine.engine.inputs import InputProcessor
from padengine.engine.sequence import Request, RequestOutput
from padengine.errors import EngineClosed, require
from padengine.executor.model_runner import ModelRunner
from padengine.models.loader import eos_token_ids, load_tokenizer
from padengine.sampling_params import SamplingParams
from padengine.engine.detokenizer import IncrementalDetokenizer, StreamOutput

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, base_model: str, reward_model: str | None = None, **kwargs):
        """`kwargs` are the fields of `EngineConfig` (device, dtype, block_size, kernels, ...)."""
        self.config = cfg = EngineConfig(base_model, reward_model, **kwargs)
        self.runner = ModelRunner(cfg)
        self.tokenizer = load_tokenizer(base_model, "base_model")
        self.reward_tokenizer = self.tokenizer
        if reward_model is not None and self.runner.placement.reward == 1:
            self.reward_tokenizer = load_tokenizer(reward_model, "reward_model")
            require(self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab(), "reward_model",
                    "its tokenizer vocabulary differs from the base model's")
        self.eos_ids = eos_token_ids(base_model, self.tokenizer)
        self.max_model_len = self.runner.max_model_len
        pools = [BlockManager(self.runner.num_blocks, cfg.block_size) for _ in self.runner.placement.models]
        self.scheduler = Scheduler(pools, cfg.max_num_seqs, self.runner.max_batched_tokens)
        self.in_flight = None       # asynchronous scheduling: the launched step not yet collected
        self.inputs = InputProcessor(self.tokenizer, self.reward_tokenizer, self.runner.vocab_size,
                                     self.max_model_len, self.eos_ids, pools, self.runner.placement,
                                     cfg.seed, cfg.max_num_seqs)

    def generate(self, prompts: list[str] | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None, *,
                 preferences: list | str | None = None,
                 prompt_token_ids: list[list[int]] | None = None,
                 reward_prompt_token_ids: list | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run PAD generation for a batch of prompts; outputs come back in input order.

        A `preferences` entry is a string, None, or a list of (text, weight) pairs (several preferences,
        each its own reward stream); a `reward_prompt_token_ids` entry is token ids or a list of
        (token_ids, weight) pairs. A single preference uses `params.weight`."""
        reqs = self.add_requests(prompts, params, preferences, prompt_token_ids, reward_prompt_token_ids)
        with tqdm(total=len(reqs), desc="PAD generate", disable=not use_tqdm) as bar:
            for _ in self._drive(reqs, lambda r: bar.update(r.is_finished)):
                pass
        return [self.output(r) for r in reqs]

    def stream(self, prompts: list[str] | None = None,
               params: SamplingParams | list[SamplingParams] | None = None, *,
               preferences: list | str | None = None, prompt_token_ids: list[list[int]] | None = None,
               reward_prompt_token_ids: list | None = None, stop: list[str] | None = None) -> Iterator[StreamOutput]:
        """Like `generate`, but yields each request's new text and token ids as they are produced.
        `stop` strings end a request and are cut from its text."""
        reqs = self.add_requests(prompts, params, preferences, prompt_token_ids, reward_prompt_token_ids)
        detok = {r.request_id: IncrementalDetokenizer(self.tokenizer, stop) for r in reqs}
        index = {r.request_id: i for i, r in enumerate(reqs)}
        for req in self._drive(reqs):
            out = self.stream_output(detok[req.request_id], req, index[req.request_id])
            if out.text or out.token_ids or out.finished:
                yield out

    def stream_output(self, detok: IncrementalDetokenizer, req: Request, index: int = 0) -> StreamOutput:
        """req's new text and tokens since the last call; a stop string found in the text ends it here."""
        out = detok.update(req, index)
        if out.finished and not req.is_finished:
            self.abort(req, "stop")
        return out

    def add_requests(self, prompts=None, params=None, preferences=None, prompt_token_ids=None,
                     reward_prompt_token_ids=None) -> list[Request]:
        """Validate (raising InvalidInput before anything is queued) and queue requests."""
        self._check_open()
        reqs = self.inputs.make_requests(prompts, params, preferences, prompt_token_ids, reward_prompt_token_ids)
        for req in reqs:
            self.scheduler.add(req)
        return reqs

    def step(self) -> list[Request]:
        """Run one scheduler step; returns the requests that got a token (finished ones included).

        Synchronous (the reference): schedule, launch, commit, collect, postprocess. Asynchronous: the
        step launched here is collected by the next call, after that call has scheduled and launched its
        own step, so the host's work for step t+1 overlaps the device's for step t; each call returns the
        previous step's tokens."""
        self._check_open()
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            try:
                pending = self.runner.launch(batch)
            except BaseException:
                self.scheduler.rollback(batch)
                raise
            self.scheduler.commit(batch)
            launched = (batch, pending)
        if self.config.async_scheduling:
            launched, self.in_flight = self.in_flight, launched
        if launched is None:
            return []
        batch, pending = launched
        return self.scheduler.postprocess(batch, self.runner.collect(pending))

    def close(self) -> None:
        """Stop the worker processes of other ranks (tensor_parallel_size > 1 or reward_device) and release
        everything the engine holds on its devices: models, value head, KV pools, CUDA graphs and their
        memory pool, pinned buffers (collected now, as their objects refer to each other, and handed
        back to the device). The engine cannot run steps afterwards. Also on leaving
        `with Engine(...) as engine:`; interpreter exit stops the workers too."""
        if self.runner is None:
            return
        device = self.runner.device
        self.runner.close()
        self.runner = self.scheduler = self.inputs = self.in_flight = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.runner is None:
            raise EngineClosed("the engine is closed: build a new one")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def has_work(self) -> bool:
        return self.runner is not None and (self.scheduler.has_work() or self.in_flight is not None)

    def abort(self, req: Request, reason: str = "abort") -> None:
        """End a request now and free its KV blocks."""
        if not req.is_finished:
            if self.scheduler is not None:      # else closed: its blocks went with it
                self.scheduler.finish(req)
            req.finish(reason)

    def output(self, req: Request) -> RequestOutput:
        return req.output(self.tokenizer.decode(req.output_ids, skip_special_tokens=True))

    def _drive(self, reqs: list[Request], on_token=lambda r: None) -> Iterator[Request]:
        """Step until every request of `reqs` has finished, yielding those that advanced. If the caller
        stops early (an exception, a closed stream), the unfinished ones are aborted, not left queued."""
        pending = {r.request_id for r in reqs}
        try:
            while pending:
                for req in self.step():
                    if req.request_id in pending:
                        on_token(req)
                        yield req
                pending = {r.request_id for r in reqs if not r.is_finished}
        finally:
            for req in reqs:
                self.abort(req)
