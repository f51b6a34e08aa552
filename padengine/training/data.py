"""The pair-data format: JSONL, one `{"prompt", "preference", "chosen", "rejected"}` object a line.

`read_pairs` validates every line (errors name the file, the line number and the field); `write_pairs` is its
inverse. `tokenize_pair` turns a pair into the token ids the trainer scores: the prompt rendered exactly as the
engine renders it for the reward model (`prompts.encode_prompt`, the PAD wording, chat template) and each
answer as the tokens the engine would have generated (no special tokens, then end-of-sequence).
"""
import json
import os

from padengine.errors import InvalidInput
from padengine.prompts import encode_prompt

FIELDS = ("prompt", "preference", "chosen", "rejected")


def read_pairs(path: str, field: str = "data") -> list[dict]:
    if not os.path.isfile(path):
        raise InvalidInput(field, f"pair file {path!r} does not exist")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{field} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(where, f"not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise InvalidInput(where, f"must be a JSON object with {', '.join(FIELDS)}")
            for key in FIELDS:
                if key not in row:
                    raise InvalidInput(f"{where}: {key}", "missing")
                if not isinstance(row[key], str) or not row[key].strip():
                    raise InvalidInput(f"{where}: {key}", f"must be a non-empty string, got {row[key]!r:.60}")
            extra = set(row) - set(FIELDS)
            if extra:
                raise InvalidInput(f"{where}: {sorted(extra)[0]}", f"unknown field (the fields are {', '.join(FIELDS)})")
            if row["chosen"] == row["rejected"]:
                raise InvalidInput(f"{where}: rejected", "is the same text as chosen")
            pairs.append(row)
    if not pairs:
        raise InvalidInput(field, f"pair file {path!r} has no pairs")
    return pairs


def write_pairs(pairs: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({k: p[k] for k in FIELDS}, ensure_ascii=False) + "\n")


def tokenize_pair(tokenizer, pair: dict, chat_template: bool = True) -> dict:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    answer = lambda text: tokenizer.encode(text, add_special_tokens=False) + eos  # noqa: E731
    return {"prompt_ids": encode_prompt(tokenizer, pair["prompt"], pair["preference"], chat_template),
            "chosen_ids": answer(pair["chosen"]), "rejected_ids": answer(pair["rejected"])}
