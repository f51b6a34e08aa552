"""The persistent batch's per-stream arrays (`Streams`), one group of streams each: the base streams, one
per row, or the reward streams, in row order. A group keeps every stream's position, block table, owner
row, index among its request's streams and weight, and advances them in place from step to step; where
its arrays are a laid-out step's own fields (`bind`), the step's slots and context lengths follow too.
`DecodeBatch` (executor/decode_batch.py) holds two groups and decides when they regroup or advance.
"""
import numpy as np

from padengine.engine.sequence import PENDING, Request
from padengine.executor.step import Forward


class Streams:
    """One group's per-stream arrays: the position each stream computes this step, its block table
    (padded with the sink block), its owner row and index among that request's streams, and its weight."""

    def __init__(self, sink: int, first: int):
        self.sink, self.first = sink, first     # first: the group's first index in a request's streams
        self.pos = np.zeros(0, np.int64)
        self.tables = np.full((0, 1), sink, np.int64)
        self.owner = np.zeros(0, np.int64)
        self.index = np.zeros(0, np.int64)
        self.weight = np.zeros(0, np.float32)
        self.fresh_ids: tuple = ()              # (streams, their token ids): read this step, not shared
        self.view: dict[str, np.ndarray] = {}   # this group's part of the last laid-out step's fields
        self.countdown = 0                      # advances until some stream's position starts a block

    def regroup(self, decode: list[Request], prev: np.ndarray, num_old_rows: int) -> None:
        """Row i's streams follow its request's; those of a row that decoded in the step before (prev[i]
        >= 0) come from the arrays, the others from the request, one token behind."""
        counts = np.array([len(r.streams) - self.first for r in decode], np.int64) if self.first else \
            np.ones(len(decode), np.int64)
        owner = np.repeat(np.arange(len(decode)), counts)
        index = np.arange(len(owner)) - (np.cumsum(counts) - counts)[owner]
        old_starts = np.cumsum(np.bincount(self.owner, minlength=num_old_rows)) - \
            np.bincount(self.owner, minlength=num_old_rows)
        src = np.full(len(owner), -1)
        kept = prev[owner] >= 0
        src[kept] = old_starts[prev[owner[kept]]] + index[kept]
        new = np.flatnonzero(~kept)
        seqs = [decode[o].streams[self.first + k] for o, k in zip(owner[new].tolist(), index[new].tolist())]
        width = max([self.tables.shape[1]] + [len(s.block_table) for s in seqs])
        tables = np.full((len(owner), width), self.sink, np.int64)
        tables[kept, :self.tables.shape[1]] = self.tables[src[kept]]
        pos, weight = np.zeros(len(owner), np.int64), np.zeros(len(owner), np.float32)
        pos[kept], weight[kept] = self.pos[src[kept]], self.weight[src[kept]]
        ids = np.zeros(len(seqs), np.int64)
        for i, (j, s) in enumerate(zip(new.tolist(), seqs)):
            pos[j] = len(s.token_ids) - 2
            tables[j, :len(s.block_table)] = s.block_table
            ids[i] = s.token_ids[-1]
            if self.first:
                weight[j] = decode[owner[j]].weights[index[j]]
        self.pos, self.tables, self.owner, self.index, self.weight = pos, tables, owner, index + self.first, weight
        self.view, self.countdown = {}, 0
        self.fresh_ids = (new, ids) if len(new) else ()

    def advance(self, decode: list[Request], block_size: int, moved: bool = False) -> bool:
        """One token further (`moved`: the positions, slots and context lengths already are): a stream
        whose new position starts a block reads that block's id. Where the arrays are a laid-out step's
        fields (`bind`), its slots and context lengths follow in place; returns False where the tables had
        to widen, so the step must be laid out anew."""
        if not moved:
            self.pos += 1
            if self.view:
                self.view["context_lens"] += 1
                self.view["slot_mapping"] += 1
        self.countdown -= 1
        if self.countdown > 0:
            return True
        offset = self.pos % block_size
        self.countdown = int((block_size - offset).min()) if len(offset) else block_size
        grow = np.flatnonzero(offset == 0)
        if not len(grow):
            return True
        blocks = self.pos[grow] // block_size
        fits = int(blocks.max()) < self.tables.shape[1]
        self.widen(int(blocks.max()) + 1)
        for j, b, o, k in zip(grow.tolist(), blocks.tolist(), self.owner[grow].tolist(), self.index[grow].tolist()):
            self.tables[j, b] = decode[o].streams[k].block_table[b]
        if self.view:
            self.view["slot_mapping"][grow] = self.tables[grow, blocks] * block_size
        return fits

    def widen(self, width: int) -> None:
        if width > self.tables.shape[1]:
            self.view = {}
            grown = np.full((len(self.pos), max(width, 2 * self.tables.shape[1])), self.sink, np.int64)
            grown[:, :self.tables.shape[1]] = self.tables
            self.tables = grown

    def bind(self, fwd: Forward, start: int) -> None:
        """Make the arrays the laid-out step's own columns (its streams from `start` in each), so that the
        next steps advance them in place."""
        end = start + len(self.pos)
        self.view = {k: getattr(fwd, k)[start:end] for k in ("input_ids", "feed", "slot_mapping", "context_lens")
                     if getattr(fwd, k) is not None}
        self.pos = fwd.positions[start:end]
        self.tables = fwd.block_tables[start:end]

    def refresh(self, last: np.ndarray) -> None:
        """This step's token ids (and their feed rows: the same order as the last step's) in place."""
        if len(self.pos):
            ids = self.view["input_ids"]
            ids[:] = last[self.owner]
            if "feed" in self.view:
                self.view["feed"][:] = np.where(ids == PENDING, self.owner, -1)

    def fields(self, last: np.ndarray, prev_rows: np.ndarray | None, pad: int, block_size: int) -> dict:
        """This step's per-stream values, then `pad` dummy streams (id 0, position 0, the sink block).
        `prev_rows`: each row's sampler row in the step before (None: the same)."""
        ids = last[self.owner]
        if self.fresh_ids:
            ids[self.fresh_ids[0]] = self.fresh_ids[1]
            self.fresh_ids = ()
        rows = self.owner if prev_rows is None else prev_rows[self.owner]
        blocks = self.pos // block_size
        slots = self.tables[np.arange(len(self.pos)), blocks] * block_size + self.pos % block_size
        zeros = np.zeros(pad, np.int64)
        return dict(input_ids=np.concatenate([ids, zeros]),
                    feed=np.concatenate([np.where(ids == PENDING, rows, -1), zeros - 1]),
                    positions=np.concatenate([self.pos, zeros]),
                    slot_mapping=np.concatenate([slots, zeros + self.sink * block_size]),
                    context_lens=np.concatenate([self.pos + 1, zeros + 1]),
                    num_blocks=np.concatenate([blocks + 1, zeros + 1]))
