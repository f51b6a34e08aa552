"""Verifiable preferences: the registry `make-pairs` labels answers with and the evaluation scores them with.

A `Checker` is a preference as a user would state it (`text`), a program that tells whether an answer follows
it (`check`), and, where one exists, a program that turns a failing answer into a passing one (`transform`:
lowercase it, keep the first sentences, drop the commas...). Checkers come in families (`short`) with
parameters (`short_40`: fewer than 40 words), so a held-out preference can be a new parameter of a trained
family or a family never trained on.

`SPLIT` says which preferences the default recipe trains on and which it holds out (never in the pairs).
"""
import re
from dataclasses import dataclass
from typing import Callable

from padengine.errors import InvalidInput

FRENCH = set("le la les de des du et est un une en que qui pour dans sur pas au aux avec ce cette il elle nous "
             "vous je sont être ou mais par plus".split())
ENGLISH = set("the and is of to in that it for with on as are this you be by or but from an".split())
BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.M)
SENTENCE = re.compile(r"[^.!?]+[.!?]+(?:\s|$)")


@dataclass(frozen=True)
class Checker:
    name: str
    family: str
    text: str                                          # the preference, as the user states it
    check: Callable[[str], bool]
    transform: Callable[[str], str] | None = None      # a failing answer -> a passing one (None: no program)


def words(text: str) -> list[str]:
    return re.findall(r"[\w'’-]+", text.lower())


def sentences(text: str) -> list[str]:
    """The complete sentences of `text` (a trailing fragment cut off by max_tokens is dropped)."""
    return [s.strip() for s in SENTENCE.findall(" ".join(text.split()))]


def _first_words(text: str, limit: int) -> str:
    """The leading whole sentences with fewer than `limit` words, or the first limit-1 words and a period."""
    out = []
    for s in sentences(text):
        if len(words(" ".join(out + [s]))) >= limit:
            break
        out.append(s)
    return " ".join(out) if out else " ".join(text.split()[:limit - 1]).rstrip(",;:") + "."


def _bulleted(text: str, count: int) -> str | None:
    items = sentences(text)
    return "\n".join(f"- {s}" for s in items) if len(items) >= count else None


def _ends_with_question(text: str) -> str:
    kept = " ".join(sentences(text)) or text.strip()
    return kept + " Would you like to know more?"


def _lowercase(t: str) -> bool:
    return any(c.isalpha() for c in t) and t == t.lower()


def _uppercase(t: str) -> bool:
    return any(c.isalpha() for c in t) and t == t.upper()


def _french(t: str) -> bool:
    w = words(t)
    return sum(x in FRENCH for x in w) > max(2, sum(x in ENGLISH for x in w))


def _title(t: str) -> bool:
    first, _, rest = t.strip().partition("\n")
    return first.startswith("Title:") and len(first.split()) >= 2 and rest.strip() != ""


def _add_title(t: str) -> str:
    return "Title: " + " ".join(words(t)[:4]).title() + "\n\n" + t.strip()


def _postscript(t: str) -> bool:
    return re.search(r"(?:^|\n)\s*P\.S\.", t) is not None


def _nonempty(check):
    return lambda t: bool(t.strip()) and check(t)


def _registry() -> dict[str, Checker]:
    checkers = [
        Checker("lowercase", "lowercase", "Write your entire answer in lowercase letters only, with no capital "
                "letters.", _lowercase, str.lower),
        Checker("lowercase_plain", "lowercase", "Never use capital letters.", _lowercase, str.lower),
        Checker("uppercase", "uppercase", "Write your entire answer in capital letters.", _uppercase, str.upper),
        Checker("no_commas", "no_commas", "Do not use any commas in your answer.",
                _nonempty(lambda t: "," not in t), lambda t: t.replace(",", "")),
        Checker("question", "question", "End your answer with a question to the reader.",
                lambda t: t.strip().endswith("?"), _ends_with_question),
        Checker("french", "french", "Answer in French.", _french),
        Checker("title", "title", "Start your answer with a title line of the form 'Title: ...'.", _title, _add_title),
        Checker("postscript", "postscript", "End your answer with a postscript starting with 'P.S.'.",
                _postscript, lambda t: t.rstrip() + "\n\nP.S. I hope this helps!"),
    ]
    for n in (15, 30, 40):
        checkers.append(Checker(f"short_{n}", "short", f"Answer in fewer than {n} words.",
                                lambda t, n=n: 0 < len(words(t)) < n, lambda t, n=n: _first_words(t, n)))
    for n in (3, 5):
        checkers.append(Checker(f"bullets_{n}", "bullets", f"Format your answer as a list of at least {n} bullet "
                                "points.", lambda t, n=n: len(BULLET.findall(t)) >= n,
                                lambda t, n=n: _bulleted(t, n)))
    return {c.name: c for c in checkers}


CHECKERS = _registry()

# The default recipe's split. Held out: new parameters of trained families (short_40 beyond short_15 and
# short_30, bullets_5 beyond bullets_3), a new wording of a trained preference (lowercase_plain), and families
# the PersRM never sees (question, french). (postscript is not trained: at 64 tokens most answers are cut
# before their end, where a P.S. would go.)
SPLIT = {
    "train": ["lowercase", "uppercase", "no_commas", "title", "short_15", "short_30", "bullets_3"],
    "held_out_parameter": ["short_40", "bullets_5"],
    "held_out_wording": ["lowercase_plain"],
    "held_out_family": ["question", "french"],
}


def get(name: str, field: str = "preferences") -> Checker:
    if name not in CHECKERS:
        raise InvalidInput(field, f"unknown preference checker {name!r}; known: {', '.join(CHECKERS)}")
    return CHECKERS[name]


def split_of(name: str) -> str:
    """'train', 'held_out_parameter', 'held_out_wording', 'held_out_family' (or 'other' outside SPLIT)."""
    return next((k for k, names in SPLIT.items() if name in names), "other")


def by_text(text: str) -> Checker | None:
    return next((c for c in CHECKERS.values() if c.text == text), None)
