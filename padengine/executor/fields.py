"""A step laid out on the host: the groups of executor/step.py packed into two flat arrays (`Fields`), and
what the device, a CUDA graph and the other ranks derive from them (`StepLayout`).
"""
import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from padengine.executor.step import GROUPS, Forward, ModelInputs, Penalties, Rewards, Rows, StepInputs, columns
from padengine.layers.attention import AttnBatch


class Fields:
    """The groups' columns packed into two flat host arrays (int64, float32); every column starts 16-byte
    aligned (Triton specializes kernels on pointer alignment). `table` locates each column: (group, model
    index or None, name, floating, start, size, 2-D shape or None)."""

    def __init__(self):
        self.parts: tuple[list, list] = ([], [])
        self.sizes = [0, 0]
        self.table: list[tuple] = []

    def add(self, group: str, m: int | None, values, first: bool = False) -> None:
        """Pack `values` (a group instance); `first`: its advancing columns only, else the others."""
        for name, col in columns(type(values)):
            v = getattr(values, name)
            if v is None or col.advances != first:
                continue
            shape = v.shape if isinstance(v, np.ndarray) and v.ndim == 2 else None
            flat = v.reshape(-1) if shape else v
            pad = -self.sizes[col.floating] % (4 if col.floating else 2)
            if pad:
                self.parts[col.floating].append([0] * pad)
            start = self.sizes[col.floating] + pad
            self.table.append((group, m, name, col.floating, start, len(flat), shape))
            self.parts[col.floating].append(flat)
            self.sizes[col.floating] = start + len(flat)

    @property
    def ints(self) -> np.ndarray:
        return _join(self.parts[0], np.int64)

    @property
    def floats(self) -> np.ndarray:
        return _join(self.parts[1], np.float32)

    def join(self) -> None:
        """Join the parts into the two arrays once, for columns that are then changed in place."""
        self.parts = ([self.ints], [self.floats])

    def views(self, ints, floats) -> dict[tuple[str, int | None], Any]:
        """Each packed group rebuilt over `ints` and `floats` (host arrays or device tensors)."""
        found: dict[tuple, dict] = {}
        for group, m, name, floating, start, size, shape in self.table:
            t = (floats if floating else ints)[start:start + size]
            found.setdefault((group, m), {})[name] = t.reshape(shape) if shape else t
        return {key: GROUPS[key[0]](**values) for key, values in found.items()}

    def arrays(self) -> dict[tuple[str, int | None], Any]:
        """The groups as views of the packed host arrays."""
        return self.views(self.ints, self.floats)

    @functools.cached_property
    def present(self) -> tuple[frozenset, int]:
        """Which columns are present, and the block tables' width (once the table is complete)."""
        width = next((shape[1] for *_, shape in self.table if shape), 0)
        return frozenset((group, name) for group, _, name, *_ in self.table), width


def _join(parts: list, dtype) -> np.ndarray:
    if len(parts) == 1 and isinstance(parts[0], np.ndarray):
        return parts[0]         # packed
    return np.concatenate([np.asarray(p, dtype) for p in parts]) if parts else np.zeros(0, dtype)


@dataclass
class ModelLayout:
    """What attention needs of one model's streams on the host."""
    num_decode: int                 # the first num_decode streams decode one token (padding included)
    query_lens: list[int]
    lens: list[int]                 # context lengths


@dataclass
class StepLayout:
    """A step laid out on the host: its packed groups and, per model, what attention needs on the host."""
    fields: Fields
    models: list[ModelLayout | None]
    num_rows: int
    reward_start: int
    num_rewards: int
    max_k: int
    num_top: int
    base_logprobs: bool
    reusable: bool = False         # a persistent decode step: the same shape as the last one keeps its views

    def header(self) -> "StepLayout":
        """The layout without its values (they travel as the two uploaded arrays): what other ranks need."""
        fields = Fields()
        fields.table = self.fields.table
        return replace(self, fields=fields)

    def shape(self) -> tuple:
        """What a step's inputs share with this one's to reuse its device arrays and views."""
        return tuple(self.fields.table), self.max_k, self.num_top, self.base_logprobs

    def key(self) -> tuple:
        """A CUDA graph's key: rows, reward streams, sampler width, table width, then the rest of what the
        captured step depends on (which optional columns are present, alternatives, base log-probs)."""
        present, width = self.fields.present
        return self.num_rows, self.num_rewards, self.max_k, width, present, self.num_top, self.base_logprobs

    def inputs(self, ints: torch.Tensor, floats: torch.Tensor, windows: list[int | None],
               static: bool) -> StepInputs:
        """The device view, given the two uploaded arrays. `static` (a graph's inputs): attention must
        not read context lengths from the host, since a replay changes them."""
        groups = self.fields.views(ints, floats)
        models = []
        for m, h in enumerate(self.models):
            if h is None:
                models.append(None)
                continue
            f = groups[("forward", m)]
            batch = AttnBatch(h.num_decode, f.slot_mapping, f.block_tables, f.context_lens, h.query_lens,
                              None if static else h.lens, windows[m], f.cu_seqlens)
            models.append(ModelInputs(f, batch))
        return StepInputs(models, self.num_rows, self.reward_start, self.num_rewards, groups[("rows", None)],
                          groups.get(("rewards", None)), groups.get(("penalties", None)), self.max_k,
                          self.num_top, self.base_logprobs)


def pack(forwards: list[Forward | None], rows: Rows, rewards: Rewards | None,
         penalties: Penalties | None) -> tuple[Fields, tuple[int, int]]:
    """The groups in two arrays: the advancing columns first, side by side (`span`: where they lie in the
    int64 array, alignment gaps included), then the rest."""
    fields = Fields()
    groups = [("forward", m, f) for m, f in enumerate(forwards) if f is not None] + \
        [(g, None, v) for g, v in (("rows", rows), ("rewards", rewards), ("penalties", penalties)) if v is not None]
    for first in (True, False):
        for group, m, values in groups:
            fields.add(group, m, values, first)
        if first:
            span = (0, fields.sizes[0])
    return fields, span
