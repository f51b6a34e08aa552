"""The executor's one interface: a scheduled batch in (`launch`), a pending result out, its tokens collected
(`collect`). It loads the models this rank holds and their KV pools, lays the step out (the persistent
decode batch, else the general layout), uploads it, and runs it: each model once over all of its streams
(`compute`), then the PAD math (executor/sampling.py); decode steps that fit a CUDA graph replay one.

When base and reward are the same folder the weights are loaded once and both roles share one model
and one KV pool: a step then runs a single forward over base and reward streams together (and a
reward prompt equal to the base prompt hits the base stream's prefix-cached blocks).

Where each model lives is the `Placement` (executor/placement.py). With several ranks, one runner per
rank holds that rank's shards and KV pool slices; rank 0's (the engine's) also schedules: each step it
broadcasts the layout to the worker processes (executor/workers.py, which run this class) and all ranks
run `compute` together, meeting in the layers' all-reduces and the distributed sampler.
"""
import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import torch

from padengine.config import DEFAULT_BATCHED_TOKENS, EngineConfig
from padengine.distributed.parallel import check_splits
from padengine.engine.sequence import Batch, Request
from padengine.errors import require
from padengine.executor.cuda_graphs import DecodeGraphs
from padengine.executor.decode_batch import DecodeBatch
from padengine.executor.kv_pool import allocate_kv
from padengine.executor.layout import layout_step
from padengine.executor.placement import place, rank_shards
from padengine.executor.sampling import Sampling
from padengine.executor.fields import StepLayout
from padengine.executor.step import ModelInputs, StepInputs, StepResult, fed
from padengine.executor.transfer import Pending, Readback, StepTokens, Uploader
from padengine.executor.workers import Workers
from padengine.kernels import get_ops
from padengine.layers.sampler import Sample
from padengine.models import value_head
from padengine.models.loader import load_config, load_model

logger = logging.getLogger(__name__)


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The reward model's stream on `device`, one for the whole process: cuBLAS keeps a workspace (32 MiB
    on Hopper) for each stream it has run on until the process ends, so a stream per engine would leave
    one behind with every engine closed."""
    return torch.cuda.Stream(device)


@dataclass
class Uploaded:
    """The last persistent decode step's device arrays and their views, reused by a step of its shape."""
    shape: tuple
    ints: torch.Tensor
    floats: torch.Tensor
    inputs: StepInputs
    step: StepLayout


class ModelRunner:
    def __init__(self, cfg: EngineConfig, rank: int = 0):
        """`rank` 0 is the engine's runner, which starts the other ranks' worker processes."""
        self.cfg, self.rank = cfg, rank
        model_cfgs = [load_config(cfg.base_model, "base_model")]
        shared = cfg.reward_model is not None and os.path.realpath(cfg.reward_model) == os.path.realpath(cfg.base_model)
        if cfg.reward_model is not None:
            if not shared:
                model_cfgs.append(load_config(cfg.reward_model, "reward_model"))
            require(model_cfgs[-1].vocab_size >= model_cfgs[0].vocab_size, "reward_model",
                    f"its vocabulary ({model_cfgs[-1].vocab_size}) is smaller than the base's "
                    f"({model_cfgs[0].vocab_size})")
        require(cfg.reward_device is None or (cfg.reward_model is not None and not shared), "reward_device",
                "places a reward model other than the base model: give one")
        self.placement = p = place(cfg.base_model, cfg.reward_model, shared, cfg.torch_device,
                                   cfg.tensor_parallel_size, cfg.reward_torch_device)
        for m, c in zip(p.models, model_cfgs):
            check_splits(c, len(m.ranks), model_cfgs[0].vocab_size, m.field)
        limit = min(c.max_position_embeddings for c in model_cfgs)
        self.max_model_len = cfg.max_model_len or limit
        require(self.max_model_len <= limit, "max_model_len",
                f"{self.max_model_len} exceeds the models' max_position_embeddings ({limit})")
        self.max_batched_tokens = cfg.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS
        self.vocab_size = model_cfgs[0].vocab_size
        self.device = p.device(rank)
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda:
            torch.cuda.set_device(self.device)
        self.workers = Workers(cfg, p.world_size, ModelRunner) if rank == 0 and p.world_size > 1 else None
        with self.workers.guard() if self.workers else contextlib.nullcontext():
            self._load(model_cfgs)
        two_on_cuda = self.on_cuda and all(m is not None for m in self.models) and len(self.models) == 2
        self.side_stream = side_stream(self.device) if two_on_cuda else None
        self.upload = Uploader(self.device)
        self.inference = torch.inference_mode()     # entered by every launch: reused, as a new one costs more
        self.readback = Readback(self.device)
        # asynchronous scheduling: each step leaves its tokens here, where the next one reads its inputs
        self.sampled_tokens = (torch.zeros(cfg.max_num_seqs, dtype=torch.long, device=self.device)
                               if cfg.async_scheduling else None)
        self.sampling = Sampling(self.models, self.value_head, p, self.shards, self.vocab_size, self.ops.sample,
                                 self.sampled_tokens, self.device)
        self.decode_batch = DecodeBatch(p, cfg.block_size, self.sink, self.vocab_size, cfg.async_scheduling)
        self.last_upload: Uploaded | None = None
        self.graphs = None
        if cfg.cuda_graphs:
            self.graphs = DecodeGraphs(self.compute, self.upload, self.sampled_tokens, self.windows, self.device,
                                       cfg.max_num_seqs, self.max_model_len, cfg.block_size, self.vocab_size)

    def _load(self, model_cfgs) -> None:
        """This rank's shards of the models it holds (None for the others), its value head and KV pools."""
        cfg, p = self.cfg, self.placement
        logger.info("placement: %s", p.describe())
        self.shards = rank_shards(p, self.rank, self.vocab_size)
        self.ops = get_ops(cfg.kernels)     # the kernels the models are built on and the sampler
        self.models = [None if s is None else
                       load_model(m.path, c, self.max_model_len, cfg.torch_dtype, self.device, m.field, self.ops, s)
                       for m, c, s in zip(p.models, model_cfgs, self.shards)]
        self.value_head = None
        if p.reward is not None and self.models[p.reward] is not None:
            self.value_head = value_head.load(cfg.reward_model, model_cfgs[-1].hidden_size, cfg.torch_dtype,
                                              self.device, "reward_model")
        self.windows = [c.sliding_window for c in model_cfgs]
        self.num_blocks = allocate_kv(cfg, self.models, self.device, self.placement.world_size,
                                      self.max_batched_tokens, self.max_model_len)
        self.sink = self.num_blocks     # one block past the last: where padding streams write

    def close(self) -> None:
        """Stop the other ranks' worker processes (a no-op on one rank)."""
        if self.workers is not None:
            self.workers.close()

    def launch(self, batch: Batch) -> Pending:
        """Queue one step on the device: the next token (with its log-probabilities) of each sampled
        request; the streams of unfinished chunked prefills only advance. Its results come back with
        `collect`; on CUDA nothing here waits for the device."""
        if self.on_cuda:
            torch.cuda.set_device(self.device)      # per thread: Triton and graph capture use the current device
        with self.inference:
            try:
                bucket = self.graphs.bucket(batch.decode) if self.graphs is not None and not batch.prefill else None
                if bucket is not None:
                    result = self.graphs.run(self.layout(batch.decode, [], bucket.pad_to, bucket.width))
                else:
                    step = self.layout(batch.decode, batch.prefill)
                    ints, floats, inputs = self._upload(step)
                    if self.workers is None:
                        result = self.compute(inputs)
                    else:
                        with self.workers.guard():
                            self.workers.broadcast(step.header(), ints, floats)
                            result = self.compute(inputs)
            except BaseException:
                self.decode_batch.reset()
                raise
            # a graph's outputs are static: its next replay overwrites them
            return self.readback.start(result, len(batch.sampled), static=bucket is not None)

    def _upload(self, step: StepLayout) -> tuple[torch.Tensor, torch.Tensor, StepInputs]:
        """The step's two value arrays on the device and its tensors there. A persistent decode step
        shaped as the last one refills the last one's device arrays and keeps their views; on the CPU
        those are the arrays' own memory, so the very step laid out last needs no copy at all."""
        shape = step.shape() if step.reusable else None
        last = self.last_upload
        if shape is not None and last is not None and last.shape == shape and (self.on_cuda or last.step is step):
            if self.on_cuda:
                self.upload(step.fields.ints, torch.long, out=last.ints)
                self.upload(step.fields.floats, torch.float32, out=last.floats)
            for x, h in zip(last.inputs.models, step.models):
                if x is not None:
                    x.batch.context_lens_cpu = h.lens
            return last.ints, last.floats, last.inputs
        ints, floats = self.upload(step.fields.ints, torch.long), self.upload(step.fields.floats, torch.float32)
        inputs = step.inputs(ints, floats, self.windows, static=False)
        self.last_upload = Uploaded(shape, ints, floats, inputs, step) if shape is not None else None
        return ints, floats, inputs

    def collect(self, pending: Pending) -> StepTokens:
        """A launched step's results, one per sampled request (waits for the step to finish)."""
        try:
            results = self.readback.collect(pending)
        except BaseException:
            self.decode_batch.reset()       # its next step must not read these tokens as the last ones
            raise
        self.decode_batch.read_back(results.tokens)
        return results

    def layout(self, decode: list[Request], prefill: list[Request], pad_to=None, width=None) -> StepLayout:
        """A decode-only step from the persistent batch where it can, else (and then resetting it) from
        the requests' streams."""
        if not prefill:
            step = self.decode_batch.layout(decode, pad_to, width)
            if step is not None:
                return step
        self.decode_batch.reset()
        return layout_step(decode, prefill, self.placement, self.cfg.block_size, self.sink, self.vocab_size,
                           pad_to, width, feed=self.sampled_tokens is not None)

    def compute(self, x: StepInputs) -> StepResult | None:
        """The step on the device: the forwards, then the PAD math. Nothing here waits on the host, so a
        CUDA graph can capture it for a decode step. With several ranks every rank runs it (a reward-only
        rank returns None)."""
        hidden = self._forward_all(x.models)
        if not x.num_rows:         # only chunks of prefills that do not finish in this step
            empty = torch.empty(0, device=self.device)
            return StepResult(Sample(empty.long(), empty, empty.long()[:, None], empty[:, None]), None)
        result = self.sampling(x, hidden)
        if result is not None and self.sampled_tokens is not None:
            self.sampled_tokens[:x.num_rows].copy_(result.sample.tokens)
        return result

    def _forward_all(self, models: list[ModelInputs | None]) -> list[torch.Tensor | None]:
        """Each model's hidden states at its streams' last tokens. On CUDA with two models, the reward
        model runs on a side stream, forked from and joined to the main one, so a small reward model
        hides behind a large base."""
        if self.side_stream is None or not all(models):
            return [self._forward(m, x) if x and self.models[m] is not None else None for m, x in enumerate(models)]
        main = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            reward = self._forward(1, models[1])
        base = self._forward(0, models[0])
        main.wait_stream(self.side_stream)
        if not torch.cuda.is_current_stream_capturing():
            reward.record_stream(main)
        return [base, reward]

    def _forward(self, m: int, x: ModelInputs) -> torch.Tensor:
        f = x.forward
        hidden = self.models[m](fed(f.input_ids, f.feed, self.sampled_tokens), f.positions, x.batch)
        return hidden if f.pick is None else hidden[f.pick]
