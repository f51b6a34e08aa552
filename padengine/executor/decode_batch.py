"""The persistent batch: a decode step's inputs, kept across steps in numpy arrays and advanced in place.

From one decode step to the next the inputs barely change: the same requests, every stream one token
further on. `layout_step` (the general path, for steps that prefill or penalize) reads every stream's
fields from the Python objects; `DecodeBatch` keeps them instead, per row (the sampler's rows: the
decoding requests in order) and per stream, in two groups: the base streams (one per row) and the reward
streams (in row order, each with its owner row and weight; `Streams`, executor/decode_streams.py). A step
- with the same requests in the same order as the step before (the steady state) advances every
  stream's position by one in numpy and reads a block id from a stream's table only where its new
  position starts a block (once in block_size steps);
- otherwise takes the rows that decoded in the step before from the arrays, by each request's previous
  sampler row (`pending_row`), and reads the others (new to decoding, or back from a prefill) from their
  streams, one token behind, so that the same advance brings them level.
It fills the groups declared in executor/step.py (every `Rows` column and ROW_SHAPE value kept per row)
with what `layout_step` gives the same batch (tests compare the two), packed from the arrays in a few
numpy calls; the packed arrays then are the batch's own, so the declared advancing columns, packed side
by side, move in one add. `pad_to` and `width` fill a CUDA graph's static shape. A step laid out by the
general path, or one that fails, resets the batch: its next step reads every request afresh.
"""
import numpy as np

from padengine.engine.sequence import Request
from padengine.executor.decode_streams import Streams
from padengine.executor.fields import ModelLayout, StepLayout, pack
from padengine.executor.placement import Placement
from padengine.executor.step import ROW_SHAPE, Forward, Rewards, Rows, columns, step_settings

ROW_COLUMNS = columns(Rows)
ADVANCING_ROWS = [name for name, col in ROW_COLUMNS if col.advances]


class DecodeBatch:
    def __init__(self, placement: Placement, block_size: int, sink: int, vocab: int, feed: bool):
        self.placement, self.block_size, self.sink, self.vocab, self.feed = placement, block_size, sink, vocab, feed
        self.base, self.reward = Streams(sink, 0), Streams(sink, 1)
        # per row: every `Rows` column (advancing ones one behind for rows new to the batch) and ROW_SHAPE
        self.rows = {name: np.zeros(0, np.float32 if col.floating else np.int64) for name, col in ROW_COLUMNS}
        self.shape = {name: np.zeros(0, np.int64) for name in ROW_SHAPE}
        self.reqs: list[Request] = []       # the last step's decoding requests, in row order
        self.prev_rows: np.ndarray | None = None     # each row's sampler row in the step before (None: the same)
        self.step: StepLayout | None = None   # the last step, whose fields the arrays are (None: none such)
        self.layout_shape = None            # its pad_to and width
        self.settled = False                # its ids and feed rows are those of a step after a steady one
        self.lens: list[np.ndarray | None] = []     # its context lengths per model
        self.span: np.ndarray | None = None         # its advancing columns (None: it has padding)
        self.drawn: list[int] = []          # the tokens read back from the last step collected

    def reset(self) -> None:
        """The last step is not the one before the next (the general path laid one out, or it failed)."""
        self.reqs, self.step = [], None

    def read_back(self, tokens: list[int]) -> None:
        """The last collected step's tokens, one per row (the next synchronous step's input ids)."""
        self.drawn = tokens

    def layout(self, decode: list[Request], pad_to: tuple[int, int] | None = None,
               width: int | None = None) -> StepLayout | None:
        """The decode-only step of `decode`; None (and a reset) if a request has penalties, whose
        occurrence lists are the general path's."""
        if decode != self.reqs:         # identity, element by element, in C
            if any(r.params.penalized for r in decode):
                self.reset()
                return None
            self._regroup(decode)
        else:
            self.prev_rows = None       # every row was the same row of the step before
        self.reqs = decode
        moved = self.step is not None and self.span is not None
        if moved:
            self.span += 1          # every advancing column, in one add
        else:
            for name in ADVANCING_ROWS:
                self.rows[name] += 1
        level = [g.advance(decode, self.block_size, moved) for g in (self.base, self.reward)]
        if self.step is None or not all(level) or self.layout_shape != (pad_to, width):
            self.step, self.layout_shape = self._layout(decode, pad_to, width), (pad_to, width)
            self.settled = False
            return self.step
        if not (self.feed and self.settled):
            # asynchronous and settled: every id is the step before's token, PENDING, fed from its own row;
            # synchronous: the step before's tokens, read back, are those of these rows
            last = np.array([r.base.token_ids[-1] for r in decode] if self.feed else self.drawn, np.int64)
            for g in (self.base, self.reward):
                g.refresh(last)
            self.settled = True
        for h, lens in zip(self.step.models, self.lens):
            if h is not None:
                h.lens = lens.tolist()
        return self.step

    def _regroup(self, decode: list[Request]) -> None:
        old = self.reqs
        rows = [r.pending_row for r in decode]
        prev = np.array([p if 0 <= p < len(old) and old[p] is r else -1 for p, r in zip(rows, decode)], np.int64)
        for g in (self.base, self.reward):
            g.regroup(decode, prev, len(old))
        kept, new = np.flatnonzero(prev >= 0), np.flatnonzero(prev < 0)
        fresh = [decode[i] for i in new.tolist()]

        def carry(values: np.ndarray, fresh_values: list) -> np.ndarray:
            out = np.zeros(len(decode), values.dtype)
            out[kept] = values[prev[kept]]
            out[new] = fresh_values
            return out
        for name, col in ROW_COLUMNS:
            self.rows[name] = carry(self.rows[name], [col.request(r) - col.advances for r in fresh])
        for name, value in ROW_SHAPE.items():
            self.shape[name] = carry(self.shape[name], [value(r, self.vocab) for r in fresh])
        self.prev_rows = np.array(rows, np.int64)
        self.step = None

    def _layout(self, decode: list[Request], pad_to, width) -> StepLayout:
        n, bs, p = len(decode), self.block_size, self.placement
        rows, num_rewards = pad_to or (n, len(self.reward.pos))
        last = np.array([r.base.token_ids[-1] for r in decode], np.int64)
        groups = [self.base.fields(last, self.prev_rows, rows - n, bs),
                  self.reward.fields(last, self.prev_rows, num_rewards - len(self.reward.pos), bs)]
        per_model = [[0]] if p.reward is None else [[0, 1]] if p.shared else [[0], [1]]
        # one width for every model's tables; eager steps round it up to a power of two, so that growing
        # contexts do not change the step's shape (and lay it out anew) whenever the longest starts a block
        w = width or 1 << (int(max(x["num_blocks"].max(initial=1) for x in groups)) - 1).bit_length()
        forwards, models = [], []
        for members in per_model:
            parts = [groups[g] for g in members]
            join = {k: np.concatenate([x[k] for x in parts]) for k in parts[0]}
            count = len(join["input_ids"])
            if not count:
                forwards.append(None)
                models.append(None)
                continue
            tables = []
            for g, x in zip(members, parts):
                group = (self.base, self.reward)[g]
                group.widen(w)
                tables += [group.tables[:, :w], np.full((len(x["input_ids"]) - len(group.pos), w), self.sink, np.int64)]
            forwards.append(Forward(join["input_ids"], join["feed"] if self.feed else None, join["positions"],
                                       join["slot_mapping"], join["context_lens"], np.concatenate(tables)))
            models.append(ModelLayout(count, [1] * count, join["context_lens"].tolist()))
        pad = rows - n
        sampler = Rows(**{name: np.concatenate([self.rows[name], np.full(pad, col.pad, self.rows[name].dtype)])
                          for name, col in ROW_COLUMNS if not col.optional or self.shape[col.when].any()})
        rewards = None
        if num_rewards:
            extra = num_rewards - len(self.reward.pos)
            rewards = Rewards(np.concatenate([self.reward.owner, np.full(extra, rows, np.int64)]),
                              np.concatenate([self.reward.weight, np.zeros(extra, np.float32)]))
        fields, span = pack(forwards, sampler, rewards, None)
        fields.join()
        views = fields.arrays()
        for m, members in enumerate(per_model):
            start = 0
            for g in members:
                if forwards[m] is not None:
                    (self.base, self.reward)[g].bind(views[("forward", m)], start)
                start += len(groups[g]["input_ids"])
        for name in ADVANCING_ROWS:        # advanced in place from now on
            self.rows[name] = getattr(views[("rows", None)], name)[:n]
        # without padding streams (whose values stay) one add moves every advancing column
        self.span = fields.ints[span[0]:span[1]] if pad == 0 and num_rewards == len(self.reward.pos) else None
        self.lens = [None if a is None else views[("forward", m)].context_lens for m, a in enumerate(forwards)]
        return StepLayout(fields, models, rows, rows if p.shared else 0, num_rewards, *step_settings(self.shape),
                          reusable=True)
