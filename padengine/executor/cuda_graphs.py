"""Decode steps in CUDA graphs.

A decode-only step is padded to a bucket of rows (requests) and of reward streams, and its block tables
to a bucket of context length (a power of two from MIN_SPAN tokens up to `max_model_len`: attention sizes
its split-K work by that width, and the host uploads tables at most twice as wide as needed). Per bucket,
the runner's `compute` (both models' forwards on their two streams, both LM heads, the reward merge and
the sampler) is captured once over static input buffers; a replay refills them with the step's two
host-to-device copies, and the runner then makes its one device-to-host copy of the results. A bucket is
captured on its first step, after an eager run of the same inputs that compiles the Triton kernels; that
warm-up also writes this step's tokens where the step reads the previous step's (asynchronous
scheduling), so they are put back before the first replay, which then computes the step once more from
the same inputs (the K/V it writes are the warm-up's again).

Steps that do not fit run eagerly: any prefill, more rows than the largest bucket, a row whose top-k
lies between MAX_FUSED_TOP_K and the vocabulary, or a whole-vocabulary row with top-p/min-p or
alternatives (the fused sampler sends those to torch, which a graph cannot hold), or a row with
penalties (their occurrence lists change size every step). Top-p/min-p, alternatives and base
log-probabilities on top-k rows are part of the graph (its key).

On the CPU (`cuda_graphs=True`, for tests) `StepGraph` emulates a graph as CUDA runs one: recording
executes nothing, and each replay executes the step over the same static input buffers and leaves its
results in the same static output tensors (overwritten by the next replay). So a first step of a bucket
runs twice (warm-up, replay) as on CUDA, and a replay sees only what was refilled into the static inputs.
"""
import logging
from dataclasses import dataclass, replace
from typing import Callable

import torch

from padengine.engine.sequence import Request
from padengine.executor.fields import StepLayout
from padengine.executor.step import StepInputs, StepResult
from padengine.executor.transfer import Uploader
from padengine.layers.sampler import MAX_FUSED_TOP_K
from padengine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MIN_SPAN = 256          # the shortest context bucket, in tokens


class StepGraph:
    """One step recorded once and replayed: on CUDA a captured `torch.cuda.CUDAGraph` (recording runs
    nothing); on the CPU (`pool` None) its emulation, which records nothing either, runs the step at each
    replay and copies the results into the outputs of the first one, so that they are static too."""

    def __init__(self, step: Callable[[], StepResult], pool):
        self.step, self.outputs, self.cuda_graph = step, None, None
        if pool is not None:
            self.cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.cuda_graph, pool=pool):
                self.outputs = step()

    def replay(self) -> StepResult:
        if self.cuda_graph is not None:
            self.cuda_graph.replay()
        elif self.outputs is None:
            self.outputs = self.step()
        else:
            _copy_into(self.outputs, self.step())
        return self.outputs


def _copy_into(static, fresh) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif isinstance(static, tuple):
        for a, b in zip(static, fresh):
            _copy_into(a, b)


@dataclass
class Graph:
    ints: torch.Tensor              # static inputs, refilled before each replay
    floats: torch.Tensor
    inputs: StepInputs              # views of ints and floats
    graph: StepGraph


@dataclass(frozen=True)
class Bucket:
    """A graph's static shape, known before the step is laid out."""
    pad_to: tuple[int, int]         # rows, reward streams
    width: int                      # blocks per table


class DecodeGraphs:
    """The decode graphs of one runner: `bucket` says whether a batch fits one (and its padded shape), the
    runner lays the step out in that shape, and `run` replays the bucket's graph over it (capturing it on
    its first step). `compute` runs a step on its inputs; `fed` is the one buffer `compute` reads and also
    writes (the asynchronous loop's fed token ids; None in the synchronous one)."""

    def __init__(self, compute: Callable[[StepInputs], StepResult], upload: Uploader, fed: torch.Tensor | None,
                 windows: list[int | None], device: torch.device, max_rows: int, max_model_len: int,
                 block_size: int, vocab: int):
        self.compute, self.upload, self.fed, self.windows, self.device = compute, upload, fed, windows, device
        self.max_model_len, self.block_size, self.vocab = max_model_len, block_size, vocab
        self.sizes = [b for b in BUCKETS if b < max_rows] + [max_rows]
        self.graphs: dict[tuple, Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None

    def _size(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    def bucket(self, decode: list[Request]) -> Bucket | None:
        """The padded shape of a decode-only batch's graph; None if the step must run eagerly."""
        num_rewards = sum(len(r.rewards) for r in decode)
        rows, reward_rows = self._size(len(decode)), self._size(num_rewards) if num_rewards else 0
        if rows is None or reward_rows is None or not all(graphable(r.params, self.vocab) for r in decode):
            return None
        span = min(max(MIN_SPAN, _pow2_ceil(max(len(s) for r in decode for s in r.streams))), self.max_model_len)
        return Bucket((rows, reward_rows), -(-span // self.block_size))

    def run(self, step: StepLayout) -> StepResult:
        """The step (laid out in its `bucket`) on the device: its results in the graph's static outputs."""
        # one sampler width per graph: the whole vocabulary, or the largest k rounded up to a power of two
        k = step.max_k
        step = replace(step, max_k=k if k == self.vocab else min(MAX_FUSED_TOP_K, self.vocab, max(16, _pow2_ceil(k))))
        key = step.key()
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(step)
            return g.graph.outputs
        self.upload(step.fields.ints, torch.long, out=g.ints)
        self.upload(step.fields.floats, torch.float32, out=g.floats)
        return g.graph.replay()

    def _capture(self, step: StepLayout) -> Graph:
        """Warm up, record and replay the step: its results, in the graph's static outputs."""
        # buffers of the graph's own (a CPU upload may share the host arrays, which the persistent batch
        # changes in place: a replay must see only what is refilled)
        ints, floats = (self.upload(v, dtype, out=torch.empty(len(v), dtype=dtype, device=self.device))
                        for v, dtype in ((step.fields.ints, torch.long), (step.fields.floats, torch.float32)))
        inputs = step.inputs(ints, floats, self.windows, static=True)
        previous = None if self.fed is None else self.fed.clone()
        self.compute(inputs)       # warm-up: compiles the Triton kernels
        if previous is not None:
            self.fed.copy_(previous)     # the warm-up left this step's tokens where the replay reads its inputs
        graph = StepGraph(lambda: self.compute(inputs), self.pool)
        graph.replay()
        if self.pool is not None:
            logger.info("captured a decode CUDA graph: %d rows, %d reward streams, top-k width %d, "
                        "%d blocks per table", step.num_rows, step.num_rewards, step.max_k,
                        inputs.models[0].batch.block_tables.shape[1])
        return Graph(ints, floats, inputs, graph)


def graphable(params: SamplingParams, vocab: int) -> bool:
    """A graph holds the fused sampler's own rows: top-k up to MAX_FUSED_TOP_K (or the whole vocabulary
    without top-p/min-p filters or alternatives, which the fused sampler leaves to torch), and no
    penalties (their occurrence lists change size every step)."""
    k = params.num_candidates(vocab)
    fused = not (params.filters or params.top_logprobs) if k == vocab else k <= MAX_FUSED_TOP_K
    return fused and not params.penalized


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()
