"""Incremental detokenization for streaming, with stop strings.

Each step decodes only a short window of recent tokens (a prefix-offset / read-offset scheme), so a
stream costs O(1) per token however long it gets; text that ends in an incomplete UTF-8 sequence is held
back until the next token completes it. Stop strings end the request and are cut from the text; the last
len(longest stop) - 1 characters are held back while a stop string could still be forming.
"""
from dataclasses import dataclass, field

from padengine.engine.sequence import Request, RequestMetrics


@dataclass
class StreamOutput:
    index: int                          # position of the request in the caller's batch
    request_id: int
    text: str                           # new text since the previous output
    token_ids: list[int]                # new token ids since the previous output
    finished: bool = False
    finish_reason: str | None = None    # "stop" | "length" | "abort"
    metrics: RequestMetrics | None = field(default=None, repr=False)
    # for the new tokens (as token_ids): the chosen token's log-probability under the PAD distribution,
    # the alternatives (id, log-probability) best first, the base model's own log-probability (empty unless
    # params.base_logprobs)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    base_logprobs: list[float] = field(default_factory=list)
    choice: int = 0                     # which of its prompt's params.n choices


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop or [] if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.prefix_offset = self.read_offset = self.seen = 0
        self.text = ""          # text decoded so far (after a stop string: cut before it)
        self.emitted = 0        # characters of self.text already returned
        self.stopped = False

    def update(self, req: Request, index: int = 0) -> StreamOutput:
        ids = req.output_ids
        seen, self.seen = self.seen, len(ids)
        new = slice(seen, len(ids))
        finished = req.is_finished
        if not self.stopped:
            searched = max(0, len(self.text) - self.hold)
            self.text += self._delta(ids, flush=finished)
            self._find_stop(searched)
        done = finished or self.stopped
        end = len(self.text) if done else max(self.emitted, len(self.text) - self.hold)
        text, self.emitted = self.text[self.emitted:end], end
        reason = "stop" if self.stopped else req.finish_reason
        return StreamOutput(index, req.request_id, text, ids[new], done, reason if done else None,
                            req.metrics if done else None, req.logprobs[new], req.top_logprobs[new],
                            req.base_logprobs[new], req.choice)

    def _delta(self, ids: list[int], flush: bool) -> str:
        decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=True)
        prefix = decode(ids[self.prefix_offset:self.read_offset])
        full = decode(ids[self.prefix_offset:])
        if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return full[len(prefix):]
        return ""

    def _find_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.emitted = min(self.emitted, len(self.text))
            self.stopped = True
