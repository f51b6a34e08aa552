"""A request and its token streams, and a scheduled step's batch of them: the host's data model, which the
executor (padengine/executor/) reads to lay a step out.

A request owns one base stream and, when it is guided, one reward stream per weighted preference; each
stream is a token list with a block table in its model's KV pool. All streams receive every chosen
token, so they advance, are preempted and are freed together.
"""
import time
from dataclasses import dataclass, field

from padengine.sampling_params import SamplingParams


PENDING = -1       # a token sampled by a step whose results the host has not read yet


class Status:
    """A request's state. Plain class attributes, not an Enum: looking up an Enum member costs about
    0.2 us, several times per request in the scheduler's per-step loops."""
    WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Sequence:
    """One token stream (prompt + generated tokens) in the KV pool `pool`."""

    def __init__(self, token_ids: list[int], pool: int):
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.pool = pool
        self.block_table: list[int] = []
        self.filled: list[int] = []     # its blocks that decoding filled, to hash when it is released
        self.num_cached_tokens = 0   # tokens whose KV came from the prefix cache at the last allocation
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (cached or computed)
        self.step_end = 0            # a prefilling stream's tokens in the cache after the scheduled step (set
                                     # by the scheduler); a decoding one's step computes its last token

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0        # prompt tokens served from the prefix cache (base stream)
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        if self.finished_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass
class RequestOutput:
    request_id: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float]                        # each token's, under the distribution it was drawn from
    metrics: RequestMetrics
    reward_prompt_token_ids: list[list[int]]     # one per reward stream (empty when unguided)
    top_logprobs: list[list[tuple[int, float]]]  # per token, params.top_logprobs (id, log-prob), best first
    base_logprobs: list[float]                   # per token, the base model's own (if params.base_logprobs)
    choice: int = 0                              # which of the prompt's params.n choices


@dataclass(eq=False)
class Request:
    request_id: int
    params: SamplingParams
    seed: int
    stop_ids: set[int]                   # end-of-sequence ids (unless ignore_eos) and stop_token_ids
    streams: list[Sequence]              # base first, then one reward stream per weighted preference
    weights: list[float]                 # the PAD weight of each reward stream
    choice: int = 0                      # index in its group (the params.n choices of one prompt)
    group: list["Request"] = field(default_factory=list)   # the prompt's choices in order (default: itself)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    base_logprobs: list[float] = field(default_factory=list)
    status: str = Status.WAITING
    finish_reason: str | None = None
    pending_row: int = -1                # the sampler row of the last step that drew this request's token
    decodes: bool = False                # every stream's KV is computed but for its last token's (set by
                                         # the scheduler: not `is_prefilling`, kept for its hot loop)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    @property
    def base(self) -> Sequence:
        return self.streams[0]

    @property
    def rewards(self) -> list[Sequence]:
        return self.streams[1:]

    def output(self, text: str) -> RequestOutput:
        prompt = lambda s: s.token_ids[:s.num_prompt_tokens]
        return RequestOutput(self.request_id, text, list(self.output_ids), prompt(self.base), self.finish_reason,
                             list(self.logprobs), self.metrics, [prompt(s) for s in self.rewards],
                             list(self.top_logprobs), list(self.base_logprobs), self.choice)

    @property
    def is_prefilling(self) -> bool:
        """Some stream still has more than its last token to compute (a chunked prefill in progress)."""
        return any(s.num_computed_tokens < len(s) - 1 for s in self.streams)

    @property
    def samples_this_step(self) -> bool:
        """The scheduled step computes every stream to its end, so it yields the next token."""
        return all(s.step_end == len(s) for s in self.streams)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def __post_init__(self):
        self.group = self.group or [self]

    @property
    def num_drawn(self) -> int:
        """Tokens generated so far, PENDING ones included: the position of the next draw."""
        return len(self.base.token_ids) - self.base.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens drawn by launched steps whose results have not been read (PENDING in the streams)."""
        return self.num_drawn - len(self.output_ids)

    def reserve(self, row: int, decoding: bool = False) -> None:
        """A launched step draws this request's next token at sampler row `row`: every stream gets a
        PENDING placeholder, which the next step reads from the device and `fill` replaces. `decoding`:
        the step computes every stream's last token, whose KV then counts as computed."""
        for s in self.streams:
            if decoding:
                s.num_computed_tokens = len(s.token_ids)
            s.token_ids.append(PENDING)
        self.pending_row = row

    def fill(self, token: int, logprob: float, top: list[tuple[int, float]] | None = None,
             base_logprob: float | None = None) -> None:
        """The oldest placeholder's token, read back: into every stream and the output; finish on a stop
        token or at max_tokens. `top` (the alternatives) and `base_logprob` are kept as far as the request
        asked for them."""
        out, params = self.output_ids, self.params
        if not out:
            self.metrics.first_token_time = time.perf_counter()
        drawn = len(out)
        for s in self.streams:
            s.token_ids[s.num_prompt_tokens + drawn] = token
        out.append(token)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top[:params.top_logprobs] if top else [])
        if params.base_logprobs:
            self.base_logprobs.append(base_logprob)
        self.metrics.num_generated_tokens = drawn + 1
        if token in self.stop_ids:
            self.finish("stop")
        elif drawn + 1 >= params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.status = Status.FINISHED
        self.metrics.finished_time = time.perf_counter()


@dataclass
class Batch:
    """One step: the requests that decode a token, the ones that prefill (a chunk or all that is left),
    and which of them the step samples (the decoding ones, then prefills that complete)."""
    decode: list[Request]
    prefill: list[Request]
    sampled: list[Request]

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)
