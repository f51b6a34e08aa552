"""Runs one step on the models: builds the flattened inputs, runs each model once over all of its
streams, computes base and reward logits of the last token of each stream, and samples.

When base and reward are the same folder the weights are loaded once and both roles share one model
and one KV pool: a step then runs a single forward over base and reward streams together (and a
reward prompt equal to the base prompt hits the base stream's prefix-cached blocks).

Where each model lives is the `Placement` (distributed/placement.py). With several ranks, one runner per
rank holds that rank's shards and KV pool slices; rank 0's (the engine's) also schedules: each step it
broadcasts the layout to the worker processes (distributed/workers.py) and all ranks run `compute`
together, meeting in the layers' all-reduces and the distributed sampler (distributed/sampler.py).
"""
import contextlib
import functools
import logging
import os

import torch

from padengine.config import DEFAULT_BATCHED_TOKENS, EngineConfig
from padengine.distributed.parallel import check_splits, rank_shards
from padengine.distributed.placement import place
from padengine.distributed.sampler import split_sample, tp_logprobs
from padengine.distributed.workers import Workers
from padengine.engine.cuda_graphs import DecodeGraphs
from padengine.engine.decode_batch import DecodeBatch
from padengine.engine.kv_pool import allocate_kv
from padengine.engine.readback import Pending, Readback, StepTokens
from padengine.engine.scheduler import Batch
from padengine.engine.sequence import Request
from padengine.engine.step_inputs import ModelInputs, StepInputs, StepLayout, StepResult, Uploader, layout_step
from padengine.errors import require
from padengine.kernels import get_ops
from padengine.layers.sampler import Sample, merge_rewards, penalizer
from padengine.models import value_head
from padengine.models.loader import load_config, load_model

logger = logging.getLogger(__name__)


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The reward model's stream on `device`, one for the whole process: cuBLAS keeps a workspace (32 MiB
    on Hopper) for each stream it has run on until the process ends, so a stream per engine would leave
    one behind with every engine closed."""
    return torch.cuda.Stream(device)


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
        self.workers = Workers(cfg, p.world_size) if rank == 0 and p.world_size > 1 else None
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
        self.decode_batch = DecodeBatch(p, cfg.block_size, self.sink, self.vocab_size, cfg.async_scheduling)
        self.last_inputs = None     # (layout shape, ints, floats, inputs, step) of the last persistent decode step
        self.sample = self.ops.sample
        self.graphs = DecodeGraphs(self, cfg.max_num_seqs) if cfg.cuda_graphs else None

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
        self.pools, self.sink = allocate_kv(cfg, self.models, self.device, self.placement.world_size,
                                            self.max_batched_tokens, self.max_model_len)

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
                result = self.graphs.run(batch.decode) if self.graphs is not None and not batch.prefill else None
                static = result is not None     # a graph's outputs: its next replay overwrites them
                if result is None:
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
            return self.readback.start(result, len(batch.sampled), static)

    def _upload(self, step: StepLayout) -> tuple[torch.Tensor, torch.Tensor, StepInputs]:
        """The step's two value arrays on the device and its tensors there. A persistent decode step
        shaped as the last one refills the last one's device arrays and keeps their views; on the CPU
        those are the arrays' own memory, so the very step laid out last needs no copy at all."""
        shape = (step.fields.fields, step.max_k, step.num_top, step.base_logprobs) if step.reusable else None
        last = self.last_inputs
        if shape is not None and last is not None and last[0] == shape and (self.on_cuda or last[4] is step):
            _, ints, floats, inputs, _ = last
            if self.on_cuda:
                self.upload(step.fields.ints, torch.long, out=ints)
                self.upload(step.fields.floats, torch.float32, out=floats)
            for x, h in zip(inputs.models, step.models):
                if x is not None:
                    x.batch.context_lens_cpu = h["lens"]
            return ints, floats, inputs
        ints, floats = self.upload(step.fields.ints, torch.long), self.upload(step.fields.floats, torch.float32)
        inputs = step.inputs(ints, floats, self.windows, static=False)
        self.last_inputs = (shape, ints, floats, inputs, step) if shape is not None else None
        return ints, floats, inputs

    def collect(self, pending: Pending) -> StepTokens:
        """A launched step's results, one per sampled request (waits for the step to finish)."""
        try:
            results = self.readback.collect(pending)
        except BaseException:
            self.decode_batch.reset()       # its next step must not read these tokens as the last ones
            raise
        self.decode_batch.drawn = results.tokens
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
        """The step on the device: forwards, LM heads, penalties, reward merge and sampler. Nothing here
        waits on the host, so a CUDA graph can capture it for a decode step. With several ranks every rank
        runs it (a reward-only rank returns None)."""
        hidden = self._forward_all(x.models)
        if not x.num_rows:         # only chunks of prefills that do not finish in this step
            empty = torch.empty(0, device=self.device)
            return StepResult(Sample(empty.long(), empty, empty.long()[:, None], empty[:, None]), None)
        t, p = x.tensors, self.placement
        penalize = None
        if "repetition" in t:
            generated = self._fed(t["generated_tokens"], t.get("generated_feed"))
            start, end = next(filter(None, self.shards)).vocab_range(self.vocab_size)
            penalize = penalizer(t, generated, x.num_rows, self.vocab_size, slice(start, end))
        raw_logits = base_logits = rows = None
        if self.models[0] is not None:
            raw_logits = base_logits = self.models[0].logits(hidden[0][:x.num_rows])
            if penalize:
                base_logits = penalize(base_logits, slice(0, x.num_rows))
        if x.num_rewards and self.models[p.reward] is not None:
            rows = self.models[p.reward].logits(hidden[p.reward][x.reward_start:x.reward_start + x.num_rewards],
                                                self.value_head)
            if penalize:
                rows = penalize(rows, t["owner"])
        if p.reward_apart or self.shards[0].size > 1:
            reward_rank = p.models[1].ranks[0] if p.reward_apart else None
            sample = split_sample(x, base_logits, rows, self.shards[0], self.vocab_size, reward_rank, self.device)
            if sample is None:      # the reward rank: its part was the exchange
                return None
        else:
            reward_logits, weight = None, torch.zeros(x.num_rows, device=self.device)
            if rows is not None:
                reward_logits, weight = merge_rewards(base_logits, rows, t["owner"], t["weights"])
            sample = self.sample(base_logits, reward_logits, t["top_k"], weight, t["temperature"], t["seed"],
                                 t["position"], t.get("top_p"), t.get("min_p"), max_k=x.max_k, num_top=x.num_top)
        if self.sampled_tokens is not None:
            self.sampled_tokens[:x.num_rows].copy_(sample.tokens)
        base_lp = None
        if x.base_logprobs and self.shards[0].size > 1:
            base_lp = tp_logprobs(raw_logits, sample.tokens, self.vocab_size, self.shards[0])
        elif x.base_logprobs:
            base_lp = torch.log_softmax(raw_logits.float(), -1).gather(1, sample.tokens[:, None]).squeeze(1)
        return StepResult(sample, base_lp)

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
        hidden = self.models[m](self._fed(x.input_ids, x.feed), x.positions, x.batch)
        return hidden if x.pick is None else hidden[x.pick]


    def _fed(self, ids: torch.Tensor, feed: torch.Tensor | None) -> torch.Tensor:
        """ids with the PENDING ones taken from the previous step's tokens (feed: their rows, else -1)."""
        return ids if feed is None else torch.where(feed >= 0, self.sampled_tokens[feed.clamp(min=0)], ids)
