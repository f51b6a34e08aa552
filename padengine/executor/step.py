"""A step's inputs, declared once: what the device reads, as typed groups of columns.

- `Forward`, one per model: its streams' token ids, positions, KV slots, block tables, context lengths
  (decoding streams and padding first, then prefilling ones);
- `Rows`: the sampler's per-request inputs (the sampled requests in order, then padding rows);
- `Rewards`: the reward streams' owner rows and weights;
- `Penalties`: penalty strengths per row and the tokens to count occurrences of.

Each column declares its dtype, whether it is present only when some row needs it, whether it advances
by one from a decode step to the next (`advances`), and, for `Rows`, how a request gives its value and
what a padding row holds. From these declarations alone: both layouts (the general one in layout.py, the
persistent decode batch in decode_batch.py) fill the same groups; executor/fields.py packs them into one
int64 and one float32 array (advancing columns side by side, so one add moves them all), which go to the
device in two copies and are viewed there as the same groups of tensors (`StepInputs`); a CUDA graph keys
on which columns are present and keeps the two arrays as its static inputs; other ranks get the layout
without its values; the samplers take `Rows` as keywords (`sampler_kwargs`).
"""
import functools
from dataclasses import dataclass, field, fields
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from padengine.layers.attention import AttnBatch
from padengine.layers.sampler import Sample


@dataclass(frozen=True)
class Column:
    floating: bool = False              # float32, else int64
    optional: bool = False              # None unless a row needs it
    advances: bool = False              # one more in every decode step
    pad: Any = 0                        # a padding row's value (`Rows`)
    request: Callable | None = None     # a request's value (`Rows`)
    when: str | None = None             # (`Rows`, optional) the ROW_SHAPE value that says a row needs it


def column(**kw) -> Any:
    return field(default=None, metadata={"column": Column(**kw)})


@functools.cache
def columns(group: type) -> tuple[tuple[str, Column], ...]:
    """A group's columns in declaration order: (name, Column)."""
    return tuple((f.name, f.metadata["column"]) for f in fields(group))


@dataclass
class Forward:
    """One model's forward over its streams."""
    input_ids: Any = column()                       # [T] every new token
    feed: Any = column(optional=True)               # [T] asynchronous loop: the previous step's sampler row that
                                                    # holds a PENDING id, else -1
    positions: Any = column(advances=True)          # [T]
    slot_mapping: Any = column(advances=True)       # [T] flat KV slot of every new token
    context_lens: Any = column(advances=True)       # [S] tokens in the cache after the step
    block_tables: Any = column()                    # [S, width] (sink-padded)
    cu_seqlens: Any = column(optional=True)         # [P + 1] query offsets of the prefilling streams
    pick: Any = column(optional=True)               # rows of the forward's output that are the picked streams'
                                                    # last tokens, in order (None: one token each, in order)


@dataclass
class Rows:
    """The sampler's rows. A padding row (a CUDA graph's spare one) is greedy and filters nothing."""
    top_k: Any = column(pad=1, request=lambda r: r.params.top_k)
    seed: Any = column(pad=0, request=lambda r: r.seed)
    temperature: Any = column(floating=True, pad=0.0, request=lambda r: r.params.temperature)
    position: Any = column(advances=True, pad=0, request=lambda r: r.num_drawn)      # the draw's position
    top_p: Any = column(floating=True, optional=True, pad=1.0, request=lambda r: r.params.top_p, when="filters")
    min_p: Any = column(floating=True, optional=True, pad=0.0, request=lambda r: r.params.min_p, when="filters")


@dataclass
class Rewards:
    """The reward streams, in row order. A padding stream belongs to row `num_rows` (dropped by the merge)."""
    owner: Any = column()
    weights: Any = column(floating=True)


@dataclass
class Penalties:
    """Per row (and one neutral row, the owner of padding streams) the three penalties; as (row, token)
    pairs the generated tokens of penalized rows and the prompt tokens of rows with a repetition penalty."""
    repetition: Any = column(floating=True)
    presence: Any = column(floating=True)
    frequency: Any = column(floating=True)
    generated_rows: Any = column()
    generated_tokens: Any = column()
    generated_feed: Any = column(optional=True)     # asynchronous loop: as Forward.feed
    prompt_rows: Any = column()
    prompt_tokens: Any = column()


GROUPS = {"forward": Forward, "rows": Rows, "rewards": Rewards, "penalties": Penalties}

# per-request host values that shape a step without being uploaded: the sampler's candidate width,
# alternatives, base log-probabilities, and whether the row filters
ROW_SHAPE = {"candidates": lambda r, vocab: r.params.num_candidates(vocab),
             "num_top": lambda r, vocab: r.params.top_logprobs,
             "base_logprobs": lambda r, vocab: r.params.base_logprobs,
             "filters": lambda r, vocab: r.params.filters}


def step_settings(shape: dict) -> tuple[int, int, bool]:
    """The step-wide sampler settings from its rows' ROW_SHAPE values (lists or arrays): the candidate width
    (the largest k), the alternatives per row, whether any row wants base log-probabilities."""
    if not len(shape["candidates"]):
        return 1, 0, False
    return int(np.max(shape["candidates"])), int(np.max(shape["num_top"])), bool(np.any(shape["base_logprobs"]))


def fed(ids: torch.Tensor, feed: torch.Tensor | None, sampled_tokens: torch.Tensor | None) -> torch.Tensor:
    """`ids` with the PENDING ones read from the previous step's tokens (`feed`: their rows there, else -1)."""
    return ids if feed is None else torch.where(feed >= 0, sampled_tokens[feed.clamp(min=0)], ids)


def sampler_kwargs(rows: Rows) -> dict:
    """The samplers' per-row keyword arguments (absent optional columns as None)."""
    return {name: getattr(rows, name) for name, _ in columns(Rows)}


@dataclass
class ModelInputs:
    """One model's forward over its streams, on the device: its columns, and attention's view of them."""
    forward: Forward
    batch: AttnBatch


@dataclass
class StepInputs:
    models: list[ModelInputs | None]
    num_rows: int                  # sampler rows: the requests, then padding
    reward_start: int              # first reward stream's row in the reward model's picked hidden
    num_rewards: int
    rows: Rows
    rewards: Rewards | None
    penalties: Penalties | None
    max_k: int                     # the sampler's candidate width: the largest top-k, or the vocabulary
    num_top: int                   # alternatives per row with their log-probabilities
    base_logprobs: bool            # also the base model's log-probability of each chosen token


class StepResult(NamedTuple):
    """A step's results on the device, one row per sampled request (then padding)."""
    sample: Sample
    base_logprobs: torch.Tensor | None
