"""The persistent batch: a decode step's inputs, kept across steps in numpy arrays and advanced in place.

From one decode step to the next the inputs barely change: the same requests, every stream one token
further on. `layout_step` (the general path, for steps that prefill or penalize) reads every stream's
fields from the Python objects; `DecodeBatch` keeps them instead, per row (the sampler's rows: the
decoding requests in order) and per stream, in two groups: the base streams (one per row) and the reward
streams (in row order, each with its owner row and weight; `Streams`, engine/decode_streams.py). A step
- with the same requests in the same order as the step before (the steady state) advances every
  stream's position by one in numpy and reads a block id from a stream's table only where its new
  position starts a block (once in block_size steps);
- otherwise takes the rows that decoded in the step before from the arrays, by each request's previous
  sampler row (`pending_row`), and reads the others (new to decoding, or back from a prefill) from their
  streams, one token behind, so that the same advance brings them level.
Its fields are the ones `layout_step` gives the same batch (tests compare the two), packed from the
arrays in a few numpy calls; `pad_to` and `width` fill a CUDA graph's static shape. A step laid out by
the general path, or one that fails, resets the batch: its next step reads every request afresh.
"""
import numpy as np

from padengine.distributed.placement import Placement
from padengine.engine.decode_streams import Streams
from padengine.engine.sampling_fields import ROW_PADDING
from padengine.engine.sequence import Request
from padengine.engine.step_inputs import Fields, StepLayout

# the per-row fields: name, dtype, and its value for a request (given the vocabulary size)
ROW_FIELDS = (("top_k", np.int64, lambda r, vocab: r.params.top_k), ("seed", np.int64, lambda r, vocab: r.seed),
              ("temperature", np.float32, lambda r, vocab: r.params.temperature),
              ("top_p", np.float32, lambda r, vocab: r.params.top_p),
              ("min_p", np.float32, lambda r, vocab: r.params.min_p),
              ("candidates", np.int64, lambda r, vocab: r.params.num_candidates(vocab)),
              ("num_top", np.int64, lambda r, vocab: r.params.top_logprobs),
              ("base_logprobs", bool, lambda r, vocab: r.params.base_logprobs),
              ("filters", bool, lambda r, vocab: r.params.filters),
              ("position", np.int64, lambda r, vocab: r.num_drawn - 1))     # one behind, as new streams


class DecodeBatch:
    def __init__(self, placement: Placement, block_size: int, sink: int, vocab: int, feed: bool):
        self.placement, self.block_size, self.sink, self.vocab, self.feed = placement, block_size, sink, vocab, feed
        self.base, self.reward = Streams(sink, 0), Streams(sink, 1)
        self.rows = {name: np.zeros(0, dtype) for name, dtype, _ in ROW_FIELDS}
        self.reqs: list[Request] = []       # the last step's decoding requests, in row order
        self.prev_rows: np.ndarray | None = None     # each row's sampler row in the step before (None: the same)
        self.step: StepLayout | None = None   # the last step, whose fields the arrays are (None: none such)
        self.shape = None                   # its pad_to and width
        self.settled = False                # its ids and feed rows are those of a step after a steady one
        self.lens: list[np.ndarray | None] = []     # its context lengths per model
        self.span: np.ndarray | None = None         # its fields that advance by one (None: it has padding)
        self.drawn: list[int] = []          # the tokens read back from the last step collected

    def reset(self) -> None:
        """The last step is not the one before the next (the general path laid one out, or it failed)."""
        self.reqs, self.step = [], None

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
            self.span += 1          # every position, slot and context length, in one add
        else:
            self.rows["position"] += 1
        level = [g.advance(decode, self.block_size, moved) for g in (self.base, self.reward)]
        if self.step is None or not all(level) or self.shape != (pad_to, width):
            self.step, self.shape = self._layout(decode, pad_to, width), (pad_to, width)
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
                h["lens"] = lens.tolist()
        return self.step

    def _regroup(self, decode: list[Request]) -> None:
        old = self.reqs
        rows = [r.pending_row for r in decode]
        prev = np.array([p if 0 <= p < len(old) and old[p] is r else -1 for p, r in zip(rows, decode)], np.int64)
        for g in (self.base, self.reward):
            g.regroup(decode, prev, len(old))
        kept, new = np.flatnonzero(prev >= 0), np.flatnonzero(prev < 0)
        fresh = [decode[i] for i in new.tolist()]
        for name, dtype, value in ROW_FIELDS:
            values = np.zeros(len(decode), dtype)
            values[kept] = self.rows[name][prev[kept]]
            values[new] = [value(r, self.vocab) for r in fresh]
            self.rows[name] = values
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
        fields, models, advancing = Fields(), [], []
        for m, members in enumerate(per_model):
            parts = [groups[g] for g in members]
            join = {k: np.concatenate([x[k] for x in parts]) for k in parts[0]}
            count = len(join["ids"])
            if not count:
                models.append(None)
                continue
            tables = []
            for g, x in zip(members, parts):
                group = (self.base, self.reward)[g]
                group.widen(w)
                tables += [group.tables[:, :w], np.full((len(x["ids"]) - len(group.pos), w), self.sink, np.int64)]
            fields.add(f"ids{m}", join["ids"])
            if self.feed:
                fields.add(f"feed{m}", join["feed"])
            fields.add(f"tables{m}", np.concatenate(tables).reshape(-1), (count, w))
            advancing += [(f"{name}{m}", join[name]) for name in ("positions", "slots", "context_lens")]
            models.append(dict(num_decode=count, query_lens=[1] * count, lens=join["context_lens"].tolist()))
        r, pad = self.rows, rows - n
        padded = lambda name: np.concatenate([r[name], np.full(pad, ROW_PADDING[name], r[name].dtype)])
        # the fields that advance by one every step, side by side: without padding streams (whose values
        # stay) one add moves them all (and the alignment gaps between them, which nothing reads)
        first = fields.sizes[0]
        for name, values in advancing:
            fields.add(name, values)
        fields.add("position", padded("position"))
        span = (first, fields.sizes[0]) if pad == 0 and num_rewards == len(self.reward.pos) else None
        fields.add("top_k", padded("top_k"))
        fields.add("seed", padded("seed"))
        fields.add("temperature", padded("temperature"), floating=True)
        if num_rewards:
            extra = num_rewards - len(self.reward.pos)
            fields.add("owner", np.concatenate([self.reward.owner, np.full(extra, rows, np.int64)]))
            fields.add("weights", np.concatenate([self.reward.weight, np.zeros(extra, np.float32)]), floating=True)
        if r["filters"].any():
            fields.add("top_p", padded("top_p"), floating=True)
            fields.add("min_p", padded("min_p"), floating=True)
        max_k = int(r["candidates"].max()) if n else 1
        num_top = int(r["num_top"].max()) if n else 0
        fields.pack()
        views = fields.arrays()
        for m, members in enumerate(per_model):
            start = 0
            for g in members:
                group = (self.base, self.reward)[g]
                if models[m] is not None:
                    group.bind({k[:-1]: v for k, v in views.items() if k.endswith(str(m))}, start)
                start += len(groups[g]["ids"])
        self.rows["position"] = views["position"][:n]
        self.span = None if span is None else fields.ints[span[0]:span[1]]
        self.lens = [None if h is None else views[f"context_lens{m}"] for m, h in enumerate(models)]
        return StepLayout(fields, models, rows, rows if p.shared else 0, num_rewards, max_k, num_top,
                          bool(r["base_logprobs"].any()), reusable=True)
