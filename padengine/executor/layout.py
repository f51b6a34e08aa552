"""The general layout: any step (decode, prefill chunks, penalties) read from the requests' streams into the
groups declared in executor/step.py. Decode-only steps usually come from the persistent batch instead
(executor/decode_batch.py), which fills the same groups; tests compare the two.

`pad_to=(rows, reward_rows)` pads a decode-only step to a graph's shape with dummy streams: they write
their K/V into the pool's sink block (which no sequence owns), read one token of it, and sample with
weight 0; their results are dropped.
"""
import numpy as np

from padengine.engine.sequence import PENDING, Request, Sequence
from padengine.executor.fields import ModelLayout, StepLayout, pack
from padengine.executor.placement import Placement
from padengine.executor.step import ROW_SHAPE, Forward, Penalties, Rewards, Rows, columns, step_settings


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
    reward_streams = [s for _, s, _ in owners] + [None] * (num_rewards - len(owners))
    picked = placement.per_model(bases, reward_streams)
    chunks = [s for r in prefill if not r.samples_this_step for s in r.streams if s.step_end > s.num_computed_tokens]
    prefilling = {id(s) for r in prefill for s in r.streams}
    forwards, models = [], []
    for m, streams in enumerate(picked):
        extra = [s for s in chunks if s.pool == m]
        a, h = _layout_model(streams, extra, prefilling, block_size, sink, width, rows_of) \
            if streams or extra else (None, None)
        forwards.append(a)
        models.append(h)
    rewards = None
    if num_rewards:
        pad = num_rewards - len(owners)
        rewards = Rewards([i for i, _, _ in owners] + [rows] * pad, [w for _, _, w in owners] + [0.0] * pad)
    shape = {name: [value(r, vocab) for r in reqs] for name, value in ROW_SHAPE.items()}
    penalized = any(r.params.penalized for r in reqs)
    fields, _ = pack(forwards, sampler_rows(reqs, rows, shape), rewards,
                     penalties(reqs, rows, feed) if penalized else None)
    return StepLayout(fields, models, rows, rows if placement.shared else 0, num_rewards, *step_settings(shape))


def sampler_rows(reqs: list[Request], rows: int, shape: dict[str, list]) -> Rows:
    """The requests' `Rows`, padded to `rows`; an optional column only where some request needs it
    (`shape`: their ROW_SHAPE values)."""
    return Rows(**{name: [col.request(r) for r in reqs] + [col.pad] * (rows - len(reqs))
                   for name, col in columns(Rows) if not col.optional or any(shape[col.when])})


def penalties(reqs: list[Request], rows: int, feed: bool) -> Penalties:
    """The step's `Penalties` (PENDING generated tokens fed on the device with `feed`)."""
    neutral = rows + 1 - len(reqs)
    out_rows, out_tokens, prompt_rows, prompt_tokens = [], [], [], []
    for i, r in enumerate(reqs):
        if r.params.penalized:
            generated = r.base.token_ids[r.base.num_prompt_tokens:]
            out_rows += [i] * len(generated)
            out_tokens += generated
        if r.params.repetition_penalty != 1.0:
            prompt = r.base.token_ids[:r.base.num_prompt_tokens]
            prompt_rows += [i] * len(prompt)
            prompt_tokens += prompt
    generated_feed = None
    if feed:
        generated_feed = [reqs[i].pending_row if t == PENDING else -1 for i, t in zip(out_rows, out_tokens)]
    return Penalties([r.params.repetition_penalty for r in reqs] + [1.0] * neutral,
                     [r.params.presence_penalty for r in reqs] + [0.0] * neutral,
                     [r.params.frequency_penalty for r in reqs] + [0.0] * neutral,
                     out_rows, out_tokens, generated_feed, prompt_rows, prompt_tokens)


def _layout_model(picked: list[Sequence | None], extra: list[Sequence], prefilling: set[int], bs: int, sink: int,
                  width: int | None, rows_of: dict[int, int] | None) -> tuple[Forward, ModelLayout]:
    """One model's streams: `picked` ones (None: padding) yield a hidden row each, `extra` ones are only
    computed. Decoding streams and padding go first in the batch. `rows_of` (asynchronous scheduling): the
    previous step's sampler row of each decoding stream, whose last id is PENDING."""
    streams = picked + extra
    order = sorted(range(len(streams)), key=lambda i: streams[i] is not None and id(streams[i]) in prefilling)
    seqs = [streams[i] for i in order]
    num_decode = sum(s is None or id(s) not in prefilling for s in seqs)
    tables = [s.block_table if s is not None else [sink] for s in seqs]
    width = width or max(len(t) for t in tables)
    starts = [s.num_computed_tokens if s is not None else 0 for s in seqs]
    lens = [1 if s is None else s.step_end if id(s) in prefilling else len(s.token_ids) for s in seqs]
    query_lens = [n - a for a, n in zip(starts, lens)]
    fwd = Forward()
    fwd.input_ids = [t for s, a, n in zip(seqs, starts, lens) for t in (s.token_ids[a:n] if s else [0])]
    if rows_of is not None:     # only a decoding stream's last id can be PENDING
        row = [rows_of.get(id(s), -1) for s in seqs]
        per_id = (r for r, q in zip(row, query_lens) for _ in range(q))
        fwd.feed = [r if t == PENDING else -1 for t, r in zip(fwd.input_ids, per_id)]
    fwd.positions = [p for a, n in zip(starts, lens) for p in range(a, n)]
    fwd.slot_mapping = [t[p // bs] * bs + p % bs for t, a, n in zip(tables, starts, lens) for p in range(a, n)]
    fwd.context_lens = lens
    fwd.block_tables = np.array([b for t in tables for b in t + [sink] * (width - len(t))],
                              np.int64).reshape(len(seqs), width)
    if num_decode < len(seqs):
        cu = [0]
        for n in query_lens[num_decode:]:
            cu.append(cu[-1] + n)
        fwd.cu_seqlens = cu
    if order != sorted(order) or num_decode < len(seqs):
        last, total = [], 0
        for n in query_lens:
            total += n
            last.append(total - 1)
        inverse = sorted(range(len(order)), key=order.__getitem__)
        fwd.pick = [last[i] for i in inverse[:len(picked)]]
    return fwd, ModelLayout(num_decode, query_lens, lens)
