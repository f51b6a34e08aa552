"""A step's device inputs: laid out on the host, uploaded in two copies, viewed as tensors on the device.

Everything one step needs on the device (token ids, positions, KV slots, block tables and context
lengths of each model's streams, which hidden rows to keep, the reward streams' owners and weights, the
sampling parameters) is written on the host into one flat int64 array and one float32 array (here from
the Python objects, for any step; engine/decode_batch.py keeps a decode step's in numpy across steps). Each goes to
the device in a single copy (through a reused pinned staging buffer on CUDA) and is viewed there as the
step's tensors, instead of a dozen small synchronous copies. A CUDA graph keeps one such pair as its
static inputs; a replay refills them in place from a batch laid out the same way.

`pad_to=(rows, reward_rows)` pads a decode-only step to a graph's shape with dummy streams: they write
their K/V into the pool's sink block (which no sequence owns), read one token of it, and sample with
weight 0; their results are dropped.
"""
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from padengine.distributed.placement import Placement
from padengine.engine.sequence import PENDING, Request, Sequence
from padengine.layers.attention import AttnBatch
from padengine.engine.sampling_fields import ROW_PADDING, penalty_fields, sampling_fields
from padengine.layers.sampler import Sample


class Fields:
    """Named fields in two flat host arrays (int64 and float32), each field a list or a numpy array;
    `views` cuts device copies of the two into tensors."""

    def __init__(self):
        self.parts: tuple[list, list] = ([], [])     # the int64 fields' values in order, the float32 ones'
        self.sizes = [0, 0]
        self.fields: list[tuple] = []

    def add(self, name: str, values, shape: tuple | None = None, floating: bool = False) -> None:
        # each field starts 16-byte aligned: Triton specializes kernels on pointer alignment, and fields
        # shifting with the batch's composition would compile new variants mid-serving
        pad = -self.sizes[floating] % (4 if floating else 2)
        if pad:
            self.parts[floating].append([0] * pad)
        start = self.sizes[floating] + pad
        self.fields.append((name, floating, start, len(values), shape))
        self.parts[floating].append(values)
        self.sizes[floating] = start + len(values)

    @property
    def ints(self) -> np.ndarray:
        return _join(self.parts[0], np.int64)

    @property
    def floats(self) -> np.ndarray:
        return _join(self.parts[1], np.float32)

    def pack(self) -> None:
        """Join the parts into the two arrays once, for fields that are then changed in place."""
        self.parts = ([self.ints], [self.floats])

    def arrays(self) -> dict[str, np.ndarray]:
        """Each field as a view of the packed host arrays."""
        return self.views(self.ints, self.floats)

    @property
    def names(self) -> set[str]:
        return {f[0] for f in self.fields}

    def views(self, ints: torch.Tensor, floats: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, floating, start, size, shape in self.fields:
            t = (floats if floating else ints)[start:start + size]
            out[name] = t.reshape(shape) if shape else t
        return out


def _join(parts: list, dtype) -> np.ndarray:
    if len(parts) == 1 and isinstance(parts[0], np.ndarray):
        return parts[0]         # packed
    return np.concatenate([np.asarray(p, dtype) for p in parts]) if parts else np.zeros(0, dtype)


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


@dataclass
class ModelInputs:
    """One model's forward over its streams."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttnBatch
    pick: torch.Tensor | None      # rows of the forward's output that are its streams' last tokens, in
                                   # stream order (None: one token per stream, already in order)
    feed: torch.Tensor | None      # per input id, the previous step's sampler row that holds it (PENDING
                                   # ids), else -1; None without asynchronous scheduling


@dataclass
class StepInputs:
    models: list[ModelInputs | None]
    num_rows: int                  # sampler rows: the requests, then padding
    reward_start: int              # first reward stream's row in the reward model's picked hidden
    num_rewards: int
    tensors: dict[str, torch.Tensor]   # top_k, temperature, seed, position [rows]; owner, weights [rewards];
                                       # top_p, min_p [rows] if any row filters; penalties if any row has one
    max_k: int                     # the sampler's candidate width: the largest top-k, or the vocabulary
    num_top: int                   # alternatives per row with their log-probabilities
    base_logprobs: bool            # also the base model's log-probability of each chosen token


class StepResult(NamedTuple):
    """A step's results on the device, one row per sampled request (then padding)."""
    sample: Sample
    base_logprobs: torch.Tensor | None


@dataclass
class StepLayout:
    """A step laid out on the host: its fields and, per model, what attention needs on the host."""
    fields: Fields
    models: list[dict | None]
    num_rows: int
    reward_start: int
    num_rewards: int
    max_k: int
    num_top: int
    base_logprobs: bool
    reusable: bool = False         # a persistent decode step: the same shape as the last one keeps its views

    def header(self) -> "StepLayout":
        """The layout without its values (they travel as the two uploaded lists): what other ranks need."""
        fields = Fields()
        fields.fields = self.fields.fields
        return replace(self, fields=fields)

    def inputs(self, ints: torch.Tensor, floats: torch.Tensor, windows: list[int | None],
               static: bool) -> StepInputs:
        """The device view, given the two uploaded lists. `static` (a graph's inputs): attention must
        not read context lengths from the host, since a replay changes them."""
        t = self.fields.views(ints, floats)
        models = []
        for m, h in enumerate(self.models):
            if h is None:
                models.append(None)
                continue
            batch = AttnBatch(h["num_decode"], t[f"slots{m}"], t[f"tables{m}"], t[f"context_lens{m}"],
                              h["query_lens"], None if static else h["lens"], windows[m], t.get(f"cu_seqlens{m}"))
            models.append(ModelInputs(t[f"ids{m}"], t[f"positions{m}"], batch, t.get(f"pick{m}"), t.get(f"feed{m}")))
        return StepInputs(models, self.num_rows, self.reward_start, self.num_rewards, t, self.max_k, self.num_top,
                          self.base_logprobs)


def layout_step(decode: list[Request], prefill: list[Request], placement: Placement, block_size: int,
                sink: int, vocab: int, pad_to: tuple[int, int] | None = None,
                width: int | None = None, feed: bool = False) -> StepLayout:
    """Lay out a step. The sampler's rows are the decoding requests, then the prefilling ones whose
    step completes their prefill; the streams of unfinished chunked prefills are computed, not sampled.
    `width` fixes the block tables' width (a graph's). `feed` (asynchronous scheduling): PENDING input ids
    are read on the device from the previous step's tokens."""
    rows_of = {id(s): r.pending_row for r in decode for s in r.streams} if feed else None
    reqs = decode + [r for r in prefill if r.samples_this_step]
    rows, num_rewards = pad_to or (len(reqs), sum(len(r.rewards) for r in reqs))
    owners = [(i, s, w) for i, r in enumerate(reqs) for s, w in zip(r.rewards, r.weights)]
    bases = [r.base for r in reqs] + [None] * (rows - len(reqs))
    rewards = [s for _, s, _ in owners] + [None] * (num_rewards - len(owners))
    picked = placement.per_model(bases, rewards)
    chunks = [s for r in prefill if not r.samples_this_step for s in r.streams if s.step_end > s.num_computed_tokens]
    prefilling = {id(s) for r in prefill for s in r.streams}
    fields = Fields()
    models = []
    for m, streams in enumerate(picked):
        extra = [s for s in chunks if s.pool == m]
        models.append(_layout_model(fields, m, streams, extra, prefilling, block_size, sink, width, rows_of)
                      if streams or extra else None)
    static = sampling_fields(reqs, owners, rows, num_rewards, vocab)
    for name, values, floating in static.values:
        fields.add(name, values, floating=floating)
    fields.add("position", [r.num_drawn for r in reqs] + [ROW_PADDING["position"]] * (rows - len(reqs)))
    if static.penalized:
        penalty_fields(fields, reqs, rows, feed)
    return StepLayout(fields, models, rows, rows if placement.shared else 0, num_rewards, static.max_k,
                      static.num_top, static.base_logprobs)


def _layout_model(fields: Fields, m: int, picked: list[Sequence | None], extra: list[Sequence],
                  prefilling: set[int], bs: int, sink: int, width: int | None,
                  rows_of: dict[int, int] | None) -> dict:
    """One model's fields: `picked` streams (None: padding) yield a hidden row each, `extra` ones are
    only computed. Decoding streams and padding go first in the batch. `rows_of` (asynchronous
    scheduling): the previous step's sampler row of each decoding stream, whose last id is PENDING."""
    streams = picked + extra
    order = sorted(range(len(streams)), key=lambda i: streams[i] is not None and id(streams[i]) in prefilling)
    seqs = [streams[i] for i in order]
    num_decode = sum(s is None or id(s) not in prefilling for s in seqs)
    tables = [s.block_table if s is not None else [sink] for s in seqs]
    width = width or max(len(t) for t in tables)
    starts = [s.num_computed_tokens if s is not None else 0 for s in seqs]
    lens = [1 if s is None else s.step_end if id(s) in prefilling else len(s.token_ids) for s in seqs]
    query_lens = [n - a for a, n in zip(starts, lens)]
    ids = [t for s, a, n in zip(seqs, starts, lens) for t in (s.token_ids[a:n] if s else [0])]
    fields.add(f"ids{m}", ids)
    if rows_of is not None:     # only a decoding stream's last id can be PENDING
        row = [rows_of.get(id(s), -1) for s in seqs]
        per_id = (r for r, q in zip(row, query_lens) for _ in range(q))
        fields.add(f"feed{m}", [r if t == PENDING else -1 for t, r in zip(ids, per_id)])
    fields.add(f"positions{m}", [p for a, n in zip(starts, lens) for p in range(a, n)])
    fields.add(f"slots{m}", [t[p // bs] * bs + p % bs for t, a, n in zip(tables, starts, lens) for p in range(a, n)])
    fields.add(f"tables{m}", [b for t in tables for b in t + [sink] * (width - len(t))], (len(seqs), width))
    fields.add(f"context_lens{m}", lens)
    if num_decode < len(seqs):
        cu = [0]
        for n in query_lens[num_decode:]:
            cu.append(cu[-1] + n)
        fields.add(f"cu_seqlens{m}", cu)
    if order != sorted(order) or num_decode < len(seqs):
        last, total = [], 0
        for n in query_lens:
            total += n
            last.append(total - 1)
        inverse = sorted(range(len(order)), key=order.__getitem__)
        fields.add(f"pick{m}", [last[i] for i in inverse[:len(picked)]])
    return dict(num_decode=num_decode, query_lens=query_lens, lens=lens)

