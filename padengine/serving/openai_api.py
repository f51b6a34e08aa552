"""The OpenAI-compatible request and response formats, with PAD's fields beside the standard ones.

`parse` checks a JSON body field by field (errors name the field, OpenAI style) and renders the prompt
for the base model and one reward prompt per preference; `completion`, `chunk` and `usage` build the
response objects. Extra fields that OpenAI clients send and PAD ignores are accepted.
"""
import time
import uuid
from dataclasses import dataclass

from padengine.errors import InvalidInput, require, require_finite, require_int
from padengine.prompts import base_preference, encode, user_message, with_preference
from padengine.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 256
ENGINE_FIELDS = {"params.max_tokens": "max_tokens", "params.temperature": "temperature", "params.weight": "pad_weight",
                 "params.top_k": "pad_top_k", "params.seed": "seed", "num_kv_blocks": "max_tokens"}


@dataclass
class ParsedRequest:
    chat: bool
    stream: bool
    include_usage: bool
    prompt_token_ids: list[int]
    rewards: list[tuple[list[int], float]] | None   # (prompt ids, weight) per preference; None: plain decoding
    params: SamplingParams
    stop: list[str]


def parse(body, chat: bool, model_name: str, tokenizer, reward_tokenizer, max_model_len: int) -> ParsedRequest:
    require(isinstance(body, dict), "body", "must be a JSON object")
    require(body.get("model") == model_name, "model", f"unknown model {body.get('model')!r}; this server serves "
            f"{model_name!r}")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None) or {}
    require(_get(body, "n", int, 1) == 1, "n", "only n = 1 is supported")
    preferences = _preferences(body.get("preference"), _number(body, "pad_weight", SamplingParams.weight))
    in_base = _get(body, "preference_in_base", bool, True)
    base_text = base_preference(preferences, in_base)
    if chat:
        messages = _messages(body.get("messages"))
        base_ids = encode(tokenizer, with_preference(messages, base_text))
        rewards = [(encode(reward_tokenizer, with_preference(messages, t)), w) for t, w in preferences]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        require(isinstance(prompt, str) and prompt != "", "prompt", "must be a non-empty string")
        base_ids = tokenizer.encode(user_message(prompt, base_text))
        rewards = [(reward_tokenizer.encode(user_message(prompt, t)), w) for t, w in preferences]
    field = "messages" if chat else "prompt"
    longest = max([len(base_ids)] + [len(ids) for ids, _ in rewards])
    require(longest < max_model_len, field, f"the prompt has {longest} tokens; this model takes at most "
            f"{max_model_len} tokens including the answer")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_model_len - longest)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    require(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop), "stop",
            "must be a string or a list of at most 4 strings")
    params = SamplingParams(max_tokens=max_tokens, top_k=_get(body, "pad_top_k", int, 10),
                            weight=0.0, temperature=_number(body, "temperature", 1.0),
                            seed=_get(body, "seed", int, None), preference_in_base=in_base,
                            ignore_eos=_get(body, "ignore_eos", bool, False))
    params.validate("params", len(tokenizer))
    return ParsedRequest(chat, stream, bool(options.get("include_usage")), base_ids, rewards or None, params, stop)


def engine_field(err: InvalidInput, chat: bool) -> str:
    """The request-body field behind an engine validation error."""
    if err.field.startswith("prompt_token_ids"):
        return "messages" if chat else "prompt"
    if err.field.startswith("reward_prompt_token_ids"):
        return "preference"
    return ENGINE_FIELDS.get(err.field, err.field)


def completion(req: ParsedRequest, model: str, text: str, finish_reason: str, completion_tokens: int) -> dict:
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if req.chat else {"text": text})
    return {"id": new_id(req), "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(req, completion_tokens)}


def chunk(req: ParsedRequest, rid: str, model: str, text: str | None, finish_reason: str | None,
          role: bool = False, usage_: dict | None = None) -> dict:
    if req.chat:
        delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
           "created": int(time.time()), "model": model, "choices": [] if usage_ else [choice]}
    if usage_:
        out["usage"] = usage_
    return out


def usage(req: ParsedRequest, completion_tokens: int) -> dict:
    prompt = len(req.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}


def new_id(req: ParsedRequest) -> str:
    return ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]


def _get(body: dict, name: str, kind, default):
    value = body.get(name)
    if value is None:
        return default
    if kind is int:
        require_int(value, name)
    else:
        require(isinstance(value, kind), name, f"must be a {kind.__name__}, got {value!r}")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    require_finite(value, name)
    return float(value)


def _messages(messages) -> list[dict]:
    require(isinstance(messages, list) and len(messages) > 0, "messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        ok = (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
              and isinstance(m.get("content"), str))
        require(ok, f"messages[{i}]", "must be {'role': 'system'|'user'|'assistant', 'content': str}")
        out.append({"role": m["role"], "content": m["content"]})
    require(any(m["role"] == "user" for m in out), "messages", "needs at least one user message")
    return out


def _preferences(value, weight: float) -> list[tuple[str, float]]:
    """`preference`: a string (weighted by pad_weight) or a list of {"text": ..., "weight": ...}."""
    if value is None:
        return []
    if isinstance(value, str):
        require(value.strip() != "", "preference", "must not be empty")
        return [(value, weight)]
    require(isinstance(value, list) and len(value) > 0, "preference",
            "must be a string or a non-empty list of {'text': str, 'weight': number}")
    out = []
    for i, p in enumerate(value):
        ok = isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"].strip()
        require(bool(ok), f"preference[{i}]", "must be {'text': str, 'weight': number}")
        require_finite(p.get("weight", weight), f"preference[{i}].weight")
        out.append((p["text"], float(p.get("weight", weight))))
    return out
