"""Preferences and prompts -> token ids for each model: the one place both the Python API (engine/inputs.py)
and the server (serving/openai_api.py) parse preferences and render prompts.

`preference_pairs` normalizes a request's preferences to [(text, weight)], with errors naming the field.
`render` gives the base prompt ids (with every preference pasted in only if `preference_in_base`) and one
(reward prompt ids, weight) per preference. The preference-bearing user message uses the PAD authors'
wording (`TEMPLATE`).

How a prompt is rendered depends on where it comes from, and each caller says so with `chat_template`:

- `Engine.generate` / `Engine.stream` with text prompts: `chat_template=True`. The text is one user message
  rendered with the model's chat template (generation prompt added).
- `POST /v1/chat/completions`: `chat_template=True`, over the whole chat.
- `POST /v1/completions`: `chat_template=False`. This is raw text completion, as in OpenAI: the text is
  encoded as it is (the tokenizer's special tokens, e.g. BOS, added), with no chat template. A preference
  still gets the PAD wording around the text, also with no template.
- Token-id prompts (`prompt_token_ids`, or a completions `prompt` of token ids) are never rendered.

A tokenizer without a chat template always gets the plain text.
"""
import os

from padengine.errors import require, require_range
from padengine.sampling_params import MAX_WEIGHT

# the 50 P-Soups prompts the PAD paper evaluates on (benchmarks and demos; never training data): data/README.md
EVAL_PROMPTS = os.path.join(os.path.dirname(__file__), "data", "koala_eval_50.json")
TEMPLATE = ("[Guidelines] Your task is to generate response by considering the following principle. "
            "[Principles] {preference} [Instruction] {prompt}")


def preference_pairs(preference, weight: float, field: str, max_count: int | None = None) -> list[tuple[str, float]]:
    """A request's preferences as [(text, weight)].

    None -> []; a string -> [(text, `weight`)] (`weight` is the request's own, validated with it); a non-empty
    list whose entries are (text, weight) pairs or {"text": ..., "weight": ...} objects (weight defaulting to
    `weight`). Texts must be non-empty, listed weights in [-MAX_WEIGHT, MAX_WEIGHT], and at most `max_count`
    entries. Errors name `field`, `field[j]` or `field[j].weight`."""
    if preference is None:
        return []
    if isinstance(preference, str):
        require(preference.strip() != "", field, "preference is empty")
        return [(preference, weight)]
    require(isinstance(preference, list) and len(preference) > 0, field,
            "must be a string, or a non-empty list of (text, weight) pairs / {'text': str, 'weight': number}")
    if max_count is not None:
        require(len(preference) <= max_count, field,
                f"at most {max_count} preferences per request, got {len(preference)}")
    pairs = []
    for j, entry in enumerate(preference):
        if isinstance(entry, dict):
            text, w = entry.get("text"), entry.get("weight", weight)
            ok = set(entry) <= {"text", "weight"}
        else:
            ok = isinstance(entry, (tuple, list)) and len(entry) == 2
            text, w = entry if ok else (None, None)
        ok = ok and isinstance(text, str) and text.strip() != ""
        require(ok, f"{field}[{j}]", "must be a (text, weight) pair or {'text': str, 'weight': number} "
                "with non-empty text")
        require_range(w, -MAX_WEIGHT, MAX_WEIGHT, f"{field}[{j}].weight")
        pairs.append((text, float(w)))
    return pairs


def user_message(prompt: str, preference: str | None) -> str:
    return prompt if preference is None else TEMPLATE.format(preference=preference, prompt=prompt)


def base_preference(preferences: list[tuple[str, float]], in_base: bool) -> str | None:
    """The preference text the base model sees: every preference pasted together, if it sees them."""
    return " ".join(text for text, _ in preferences) if preferences and in_base else None


def with_preference(messages: list[dict], preference: str | None) -> list[dict]:
    """A chat with the PAD wording around its last user message."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    return [dict(m, content=user_message(m["content"], preference)) if i == last else m
            for i, m in enumerate(messages)]


def encode(tokenizer, message: str | list[dict]) -> list[int]:
    """Token ids of one user message (a string) or of a whole chat (a list of {role, content}), rendered
    with the chat template."""
    messages = [{"role": "user", "content": message}] if isinstance(message, str) else message
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n".join(m["content"] for m in messages))


def encode_prompt(tokenizer, prompt: str | list[dict], preference: str | None, chat_template: bool) -> list[int]:
    """A text prompt or a chat, with the PAD wording for `preference` (None: none), as token ids. A chat is
    always rendered with the template; a text prompt only with `chat_template` (else raw text)."""
    if isinstance(prompt, list):
        return encode(tokenizer, with_preference(prompt, preference))
    message = user_message(prompt, preference)
    return encode(tokenizer, message) if chat_template else tokenizer.encode(message)


def render(tokenizer, reward_tokenizer, prompt: str | list[dict], preferences: list[tuple[str, float]],
           preference_in_base: bool, chat_template: bool) -> tuple[list[int], list[tuple[list[int], float]]]:
    """The base prompt ids and one (reward prompt ids, weight) per preference (none without preferences)."""
    base = encode_prompt(tokenizer, prompt, base_preference(preferences, preference_in_base), chat_template)
    return base, [(encode_prompt(reward_tokenizer, prompt, text, chat_template), w) for text, w in preferences]
