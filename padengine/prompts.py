"""Turning a text prompt and a preference into token ids for each model.

The preference-bearing message uses the PAD authors' wording; it is rendered with the model's own chat
template (generation prompt added), or used as plain text when the tokenizer has no template.
"""

TEMPLATE = ("[Guidelines] Your task is to generate response by considering the following principle. "
            "[Principles] {preference} [Instruction] {prompt}")


def user_message(prompt: str, preference: str | None) -> str:
    return prompt if preference is None else TEMPLATE.format(preference=preference, prompt=prompt)


def encode(tokenizer, message: str) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(message)
