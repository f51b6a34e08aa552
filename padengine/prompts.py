"""Turning prompts, chat messages and preferences into token ids for each model.

The preference-bearing user message uses the PAD authors' wording; it is rendered with the model's own
chat template (generation prompt added), or used as plain text when the tokenizer has no template.
"""

TEMPLATE = ("[Guidelines] Your task is to generate response by considering the following principle. "
            "[Principles] {preference} [Instruction] {prompt}")


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
    """Token ids of one user message (a string) or of a whole chat (a list of {role, content})."""
    messages = [{"role": "user", "content": message}] if isinstance(message, str) else message
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n".join(m["content"] for m in messages))
