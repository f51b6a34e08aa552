"""The OpenAI request fields padengine refuses: each would change the output in a way padengine does not
do (tools, JSON mode, logit bias, beam search, guided decoding, ...). A refused field sent with anything but
its neutral value gets a 400 naming it (`openai_api.parse` checks them first) rather than being ignored.
Each table maps a field to (is this value neutral?, why it is refused otherwise): `REFUSED` for both
endpoints, `CHAT_REFUSED` and `COMPLETIONS_REFUSED` for one each.
"""


def _none(value, body) -> bool:
    return value is None


def _empty(value, body) -> bool:
    return value is None or value == [] or value == {}


def _false(value, body) -> bool:
    return value is None or value is False


def _one_of(*neutral):
    return lambda value, body: value is None or any(value == v and type(value) is type(v) for v in neutral)


# field -> (is its value neutral?, why it is refused otherwise)
NO_TOOLS = "tool and function calling are not supported"
REFUSED = {
    "tools": (_empty, NO_TOOLS),
    "tool_choice": (_one_of("none", "auto"), NO_TOOLS),
    "functions": (_empty, NO_TOOLS),
    "function_call": (_one_of("none", "auto"), NO_TOOLS),
    "parallel_tool_calls": (_none, NO_TOOLS),
    "response_format": (_one_of({"type": "text"}), "only {'type': 'text'} is supported (no JSON mode or schema)"),
    "logit_bias": (_empty, "is not supported"),
    "audio": (_none, "audio output is not supported"),
    "modalities": (_one_of(["text"]), "only ['text'] is supported"),
    "prediction": (_none, "predicted outputs are not supported"),
    "web_search_options": (_none, "web search is not supported"),
    "reasoning_effort": (_none, "is not supported"),
    "verbosity": (_none, "is not supported"),
    # vLLM extensions
    "use_beam_search": (_false, "beam search is not supported"),
    "min_tokens": (_one_of(0), "is not supported"),
    "prompt_logprobs": (_none, "prompt log-probabilities are not supported"),
    "guided_json": (_none, "guided decoding is not supported"),
    "guided_regex": (_none, "guided decoding is not supported"),
    "guided_choice": (_none, "guided decoding is not supported"),
    "guided_grammar": (_none, "guided decoding is not supported"),
    "structured_outputs": (_none, "guided decoding is not supported"),
    "include_stop_str_in_output": (_false, "is not supported: stop strings are cut from the text"),
    "skip_special_tokens": (_one_of(True), "is not supported: special tokens are always left out of the text"),
    "allowed_token_ids": (_empty, "is not supported"),
    "bad_words": (_empty, "is not supported"),
    "logits_processors": (_empty, "is not supported"),
    "truncate_prompt_tokens": (_none, "is not supported"),
}
CHAT_REFUSED = {
    "chat_template": (_none, "is not supported: the model's own chat template is used"),
    "chat_template_kwargs": (_empty, "is not supported"),
    "add_generation_prompt": (_one_of(True), "is not supported: the generation prompt is always added"),
    "continue_final_message": (_false, "is not supported"),
    "documents": (_empty, "is not supported"),
    "echo": (_false, "is not supported"),
}
COMPLETIONS_REFUSED = {
    "echo": (_false, "is not supported"),
    "suffix": (_one_of(""), "insertion (suffix) is not supported"),
    "best_of": (lambda value, body: value is None or value == (body.get("n") or 1),
                "is not supported (best_of must equal n)"),
}
