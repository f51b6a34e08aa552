"""The OpenAI-compatible response objects: completions, stream chunks, usage and log-probabilities.

`completion` joins a request's choices (`Choice`, filled from its `StreamOutput`s) into one reply;
`chunk` and `usage_chunk` are the server-sent events of a stream; `logprobs_object` gives a choice's
`logprobs` in the chat or the completions format, with PAD's base-model log-probabilities beside them
when asked for. Token texts and bytes come from `TokenStrings`.
"""
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from padengine.engine.detokenizer import StreamOutput

if TYPE_CHECKING:
    from padengine.serving.openai_api import ParsedRequest

MIN_LOGPROB = -9999.0          # what a log-probability of -inf is reported as (JSON has no infinity)


@dataclass
class Choice:
    """One choice's outputs joined (the non-streaming reply)."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    base_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: StreamOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        self.base_logprobs += out.base_logprobs
        self.finish_reason = out.finish_reason if out.finished else self.finish_reason


def completion(req: "ParsedRequest", model: str, choices: list[Choice], strings: "TokenStrings") -> dict:
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        choice = {"index": c.index, "finish_reason": c.finish_reason,
                  "logprobs": logprobs_object(req, strings, c) if req.logprobs else None}
        choice.update({"message": {"role": "assistant", "content": c.text}} if req.chat else {"text": c.text})
        out.append(choice)
    return {"id": new_id(req), "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": out,
            "usage": usage(req, sum(len(c.token_ids) for c in choices))}


def chunk(req: "ParsedRequest", rid: str, model: str, index: int, text: str | None, finish_reason: str | None,
          role: bool = False, logprobs: dict | None = None) -> dict:
    if req.chat:
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(req: "ParsedRequest", rid: str, model: str, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(req, completion_tokens)}


def usage(req: "ParsedRequest", completion_tokens: int) -> dict:
    """Each prompt counted once, however many choices it has; completion tokens summed over choices."""
    prompt = sum(len(ids) for ids in req.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def new_id(req: "ParsedRequest") -> str:
    return ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]


class TokenStrings:
    """A token id's text (`tokenizer.decode([id])`, special tokens shown) and its UTF-8 bytes; for a token
    that is part of a multi-byte character (its text decodes to U+FFFD), the token's own bytes where the
    tokenizer is byte-level (GPT-2 style) or has byte-fallback tokens (<0xAB>). Cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            data = list(text.encode("utf-8"))
            if "\ufffd" in text:
                data = _raw_bytes(self.tokenizer.convert_ids_to_tokens(token_id)) or data
            self.cache[token_id] = text, data
        return self.cache[token_id]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character a byte-level BPE token uses for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_alphabet()


def _raw_bytes(token: str | None) -> list[int] | None:
    if not token:
        return None
    fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
    if fallback:
        return [int(fallback.group(1), 16)]
    if all(c in BYTE_LEVEL for c in token):
        return [BYTE_LEVEL[c] for c in token]
    return None


def _lp(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def logprobs_object(req: "ParsedRequest", strings: TokenStrings, out, text_offset: int = 0) -> dict | None:
    """`choice.logprobs` for `out`'s tokens (a StreamOutput or a Choice): chat's {"content": [...]} or
    completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; PAD's base-model
    log-probabilities beside them (`pad_base_logprob` / `pad_base_token_logprobs`) when asked for.
    Completions' `text_offset` counts characters of the token texts from `text_offset` on."""
    base = out.base_logprobs if req.params.base_logprobs else None
    if req.chat:
        content = []
        for k, (tid, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            token, data = strings(tid)
            entry = {"token": token, "logprob": _lp(lp), "bytes": data, "top_logprobs": [
                {"token": t, "logprob": _lp(l), "bytes": b}
                for (t, b), l in ((strings(a), l) for a, l in _top(out, k))]}
            if base is not None:
                entry["pad_base_logprob"] = _lp(base[k])
            content.append(entry)
        return {"content": content}
    tokens, offsets, top = [], [], []
    for k, (tid, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        token = strings(tid)[0]
        tokens.append(token)
        offsets.append(text_offset)
        text_offset += len(token)
        alternatives = {}
        for a, l in _top(out, k) + [(tid, lp)]:          # as OpenAI: the chosen token is always listed
            alternatives.setdefault(strings(a)[0], _lp(l))
        top.append(alternatives)
    obj = {"tokens": tokens, "token_logprobs": [_lp(x) for x in out.logprobs], "top_logprobs": top,
           "text_offset": offsets}
    if base is not None:
        obj["pad_base_token_logprobs"] = [_lp(x) for x in base]
    return obj


def _top(out, k: int) -> list[tuple[int, float]]:
    return list(out.top_logprobs[k]) if k < len(out.top_logprobs) else []
