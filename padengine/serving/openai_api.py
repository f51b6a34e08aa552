"""The OpenAI-compatible request and response formats, with PAD's fields beside the standard ones.

`parse` checks a JSON body field by field (errors name the body field, OpenAI style) and renders the
prompts through `padengine.prompts`, the same code as the Python API: for the base model, and one reward
prompt per preference. `/v1/chat/completions` renders the chat with the model's chat template;
`/v1/completions` is raw text completion as in OpenAI (no chat template; see `padengine/prompts.py`).
The response objects are built in `openai_format.py`.

Fields are of three kinds:
- used (read by `parse`; listed in README's Serving section): the OpenAI fields padengine implements, PAD's
  `preference`, `pad_weight`, `pad_top_k`, `preference_in_base`, `pad_base_logprobs`, and a few vLLM
  extensions (`min_p`, `repetition_penalty`, `top_k`, `stop_token_ids`, `ignore_eos`);
- refused (`openai_refused.py`): fields that would change the output in a way
  padengine does not do. Sent with anything but their neutral value, they get a 400 naming the field
  rather than being ignored;
- anything else is accepted and ignored, since OpenAI clients send fields that change nothing here
  (`user`, `metadata`, `store`, `service_tier`, `safety_identifier`, `prompt_cache_key`, ...).
"""
import re
from dataclasses import dataclass

from padengine.errors import InvalidInput, require, require_finite, require_int, require_range
from padengine.prompts import encode_prompt, preference_pairs, render
from padengine.sampling_params import MAX_N, MAX_TOP_LOGPROBS, MAX_WEIGHT, SamplingParams
from padengine.serving.openai_refused import CHAT_REFUSED, COMPLETIONS_REFUSED, NO_TOOLS, REFUSED

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_PREFERENCES = 8

# SamplingParams / engine field -> body field (the request-dependent ones are in `body_field`)
ENGINE_FIELDS = {"params.temperature": "temperature", "params.weight": "pad_weight", "params.top_k": "pad_top_k",
                 "params.seed": "seed", "params.top_p": "top_p", "params.min_p": "min_p",
                 "params.repetition_penalty": "repetition_penalty", "params.presence_penalty": "presence_penalty",
                 "params.frequency_penalty": "frequency_penalty", "params.n": "n",
                 "params.base_logprobs": "pad_base_logprobs", "params.stop_token_ids": "stop_token_ids",
                 "params.ignore_eos": "ignore_eos", "params.preference_in_base": "preference_in_base",
                 "num_kv_blocks": "max_tokens"}


@dataclass
class ParsedRequest:
    chat: bool
    stream: bool
    include_usage: bool
    prompt_token_ids: list[list[int]]                   # the base prompt of each prompt (a chat: one)
    rewards: list[list[tuple[list[int], float]]] | None  # per prompt, (prompt ids, weight) per preference;
    params: SamplingParams                               # None: plain decoding
    stop: list[str]
    logprobs: bool = False              # report log-probabilities (chat: logprobs true; completions: an int)
    max_tokens_field: str = "max_tokens"
    multi: bool = False                 # completions: `prompt` was a list of prompts

    @property
    def num_choices(self) -> int:
        return len(self.prompt_token_ids) * self.params.n


def parse(body, chat: bool, model_name: str, tokenizer, reward_tokenizer, max_model_len: int,
          max_preferences: int = DEFAULT_MAX_PREFERENCES) -> ParsedRequest:
    require(isinstance(body, dict), "body", "must be a JSON object")
    require(body.get("model") == model_name, "model", f"unknown model {body.get('model')!r}; this server serves "
            f"{model_name!r}")
    for name, (neutral, why) in (REFUSED | (CHAT_REFUSED if chat else COMPLETIONS_REFUSED)).items():
        require(neutral(body.get(name), body), name, f"{why} (padengine refuses it rather than ignoring it)")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None) or {}
    n = _get(body, "n", int, 1)
    pad_weight = _number(body, "pad_weight", SamplingParams.weight)
    require_range(pad_weight, -MAX_WEIGHT, MAX_WEIGHT, "pad_weight")
    preferences = preference_pairs(body.get("preference"), pad_weight, "preference", max_preferences)
    in_base = _get(body, "preference_in_base", bool, True)
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_field)
    if max_tokens is not None:
        require_int(max_tokens, max_field)
        require(max_tokens >= 1, max_field, f"must be at least 1, got {max_tokens}")

    prompts = [_messages(body.get("messages"))] if chat else _completion_prompts(body.get("prompt"))
    multi = not chat and isinstance(body.get("prompt"), list) and not _is_ids(body.get("prompt"))
    require(not multi or len(prompts) * n <= MAX_N, "prompt",
            f"{len(prompts)} prompts x n {n} = {len(prompts) * n} choices; at most {MAX_N} per request")
    base_ids, rewards = [], []
    for i, prompt in enumerate(prompts):
        field_ = "messages" if chat else f"prompt[{i}]" if multi else "prompt"
        if isinstance(prompt, list) and not chat:       # token ids, used as they are
            require(not preferences, "preference", "cannot be combined with a token-id prompt: the reward "
                    "prompt is rendered from text; send the prompt as text")
            ids, prompt_rewards = list(prompt), []
        else:
            ids, prompt_rewards = render(tokenizer, reward_tokenizer, prompt, preferences, in_base, chat_template=chat)
        _check_length(ids, prompt_rewards, max_tokens, max_model_len, field_,
                      lambda: encode_prompt(tokenizer, prompt, None, chat) if preferences and in_base else ids)
        base_ids.append(ids)
        rewards.append(prompt_rewards)
    if max_tokens is None:
        longest = max(len(ids) for ids in base_ids + [r for rs in rewards for r, _ in rs])
        max_tokens = min(DEFAULT_MAX_TOKENS, max_model_len - longest)

    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    require(isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop), "stop",
            "must be a string or a list of at most 4 strings")
    stop_ids = _get(body, "stop_token_ids", list, None)
    logprobs, top_logprobs = _logprobs(body, chat)
    base_logprobs = _get(body, "pad_base_logprobs", bool, False)
    require(logprobs or not base_logprobs, "pad_base_logprobs",
            "needs logprobs (true for chat completions, an integer for completions)")
    top_k = _top_k(body)
    params = SamplingParams(max_tokens=max_tokens, top_k=top_k, weight=0.0,
                            temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                            min_p=_number(body, "min_p", 0.0),
                            repetition_penalty=_number(body, "repetition_penalty", 1.0),
                            presence_penalty=_number(body, "presence_penalty", 0.0),
                            frequency_penalty=_number(body, "frequency_penalty", 0.0),
                            top_logprobs=top_logprobs, base_logprobs=base_logprobs, n=n,
                            seed=_get(body, "seed", int, None), stop_token_ids=stop_ids,
                            ignore_eos=_get(body, "ignore_eos", bool, False), preference_in_base=in_base)
    req = ParsedRequest(chat, stream, bool(options.get("include_usage")), base_ids,
                        rewards if any(rewards) else None, params, stop, logprobs, max_field, multi)
    try:
        params.validate("params", len(tokenizer))
    except InvalidInput as e:
        raise engine_error(e, req, top_k_field="top_k" if body.get("pad_top_k") is None and
                           body.get("top_k") is not None else "pad_top_k") from None
    return req


def engine_error(err: InvalidInput, req: ParsedRequest, top_k_field: str = "pad_top_k") -> InvalidInput:
    """An engine validation error, renamed to the request-body field behind it (its message kept)."""
    name, message = body_field(err.field, req, top_k_field), str(err).split(": ", 1)[-1]
    return err if name == err.field else InvalidInput(name, message)


def body_field(name: str, req: ParsedRequest, top_k_field: str = "pad_top_k") -> str:
    if name.startswith("prompt_token_ids"):
        if req.chat:
            return "messages"
        index = re.match(r"prompt_token_ids\[(\d+)\]", name)
        return f"prompt[{index.group(1)}]" if req.multi and index else "prompt"
    if name.startswith("reward_prompt_token_ids"):
        return "preference"
    special = {"params.max_tokens": req.max_tokens_field, "params.top_k": top_k_field,
               "params.top_logprobs": "top_logprobs" if req.chat else "logprobs"}
    return special.get(name) or ENGINE_FIELDS.get(name, name)


# ---- field parsing -----------------------------------------------------------------------------------------

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


def _top_k(body: dict) -> int:
    """PAD's `pad_top_k` (default 10), or vLLM's `top_k` (-1 or 0: the whole vocabulary) if only it is given."""
    if body.get("pad_top_k") is None and body.get("top_k") is not None:
        top_k = _get(body, "top_k", int, 0)
        return max(top_k, 0)
    return _get(body, "pad_top_k", int, 10)


def _logprobs(body: dict, chat: bool) -> tuple[bool, int]:
    """(report logprobs?, alternatives per token). Chat: `logprobs` a bool, `top_logprobs` 0-20 (needs
    logprobs true). Completions: `logprobs` an integer 0-20 (OpenAI allows 5), the alternatives."""
    if chat:
        on = _get(body, "logprobs", bool, False)
        top = _get(body, "top_logprobs", int, 0)
        require(0 <= top <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        require(on or top == 0, "top_logprobs", "needs logprobs: true")
        return on, top
    value = None if body.get("logprobs") is False else _get(body, "logprobs", int, None)
    if value is None:
        return False, 0
    require(0 <= value <= MAX_TOP_LOGPROBS, "logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {value}")
    return True, value


def _messages(messages) -> list[dict]:
    require(isinstance(messages, list) and len(messages) > 0, "messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        require(isinstance(m, dict), f"messages[{i}]", "must be {'role': 'system'|'user'|'assistant', 'content': str}")
        require(m.get("role") not in ("tool", "function") and not m.get("tool_calls") and not m.get("function_call"),
                f"messages[{i}]", NO_TOOLS)
        role = "system" if m.get("role") == "developer" else m.get("role")
        require(role in ("system", "user", "assistant"), f"messages[{i}]",
                "must be {'role': 'system'|'developer'|'user'|'assistant', 'content': str}")
        out.append({"role": role, "content": _content(m.get("content"), f"messages[{i}]")})
    require(any(m["role"] == "user" for m in out), "messages", "needs at least one user message")
    return out


def _content(content, name: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    require(isinstance(content, list), f"{name}.content", "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        ok = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        require(ok, f"{name}.content[{j}]", "only {'type': 'text', 'text': str} parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def _is_ids(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def _completion_prompts(prompt) -> list[str | list[int]]:
    """`prompt` as OpenAI allows it: a string, a list of token ids, or a list of either (one choice each)."""
    if isinstance(prompt, str):
        require(prompt != "", "prompt", "must be a non-empty string")
        return [prompt]
    if _is_ids(prompt):
        return [prompt]
    require(isinstance(prompt, list) and len(prompt) > 0, "prompt",
            "must be a non-empty string, a list of token ids, or a non-empty list of those")
    for i, p in enumerate(prompt):
        require((isinstance(p, str) and p != "") or _is_ids(p), f"prompt[{i}]",
                "must be a non-empty string or a non-empty list of token ids")
    return prompt


def _check_length(base: list[int], rewards: list[tuple[list[int], float]], max_tokens: int | None,
                  max_model_len: int, prompt_field: str, bare) -> None:
    """Every stream's prompt + max_tokens (at least one token when max_tokens is not given) must fit in
    max_model_len. Blamed on the prompt if it is too long without its preferences (`bare()`: its ids then),
    else on `preference`."""
    answer = max_tokens or 1
    longest = max([len(base)] + [len(ids) for ids, _ in rewards])
    if longest + answer <= max_model_len:
        return
    name = prompt_field if len(bare()) + answer > max_model_len else "preference"
    what = "the prompt" if name == prompt_field else "the prompt with its preference"
    asked = f" and {max_tokens} for the answer (max_tokens)" if max_tokens else " and at least one for the answer"
    raise InvalidInput(name, f"{what} has {longest} tokens{asked}; this model takes at most {max_model_len} "
                       f"tokens in all")
