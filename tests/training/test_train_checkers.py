"""The preference checkers: what each accepts, and that every transform turns failing answers into passing ones."""
import pytest

from padengine.errors import InvalidInput
from padengine.training import checkers

ANSWERS = ["The sky is blue because of Rayleigh scattering. Short waves scatter more, so blue light fills the sky. "
           "At sunset, light crosses more air. Red remains.",
           "Paris, the capital of France, is on the Seine, a river.",
           "Here are tips:\n\n1. Sleep early, and often. 2. Drink water",
           "Photosynthesis is how plants make food from light. Leaves take in carbon dioxide from the air and water "
           "from the soil. Chlorophyll captures the energy of sunlight and turns it into sugar. Oxygen is released as "
           "a by-product. Without it there would be little life on Earth, and no oxygen to breathe."]


def test_checks():
    ok = lambda name, text: checkers.get(name).check(text)
    assert ok("lowercase", "all small here.") and not ok("lowercase", "Not here.") and not ok("lowercase", "123")
    assert ok("uppercase", "ALL CAPS 1.") and not ok("uppercase", "ALL CAPs")
    assert ok("short_40", "a few words") and not ok("short_40", "word " * 40) and not ok("short_40", "")
    assert ok("short_15", "word " * 14) and not ok("short_15", "word " * 15)
    assert ok("bullets_3", "Tips:\n- one\n* two\n3. three") and not ok("bullets_3", "- one\n- two")
    assert ok("no_commas", "no commas at all") and not ok("no_commas", "one, two") and not ok("no_commas", " ")
    assert ok("question", "Is it?  ") and not ok("question", "It is.")
    assert ok("french", "Le chat est sur la table et il dort.")
    assert not ok("french", "The cat is on the table and it sleeps, le chat.")
    assert ok("title", "Title: Sky\n\nIt is blue.") and not ok("title", "Title: Sky") and not ok("title", "Sky\nblue")
    assert ok("postscript", "Blue.\n\nP.S. Red at dusk.") and not ok("postscript", "Blue. PS red")


@pytest.mark.parametrize("name", [c.name for c in checkers.CHECKERS.values() if c.transform])
def test_transforms_make_failing_answers_pass(name):
    c = checkers.get(name)
    changed = 0
    for answer in ANSWERS:
        if c.check(answer):
            continue
        out = c.transform(answer)
        if out is None:            # no program for this answer (bullets from too few sentences)
            continue
        assert c.check(out), (name, out)
        changed += 1
    assert changed > 0


def test_short_transform_keeps_whole_sentences():
    out = checkers.get("short_15").transform(ANSWERS[0])
    assert out == "The sky is blue because of Rayleigh scattering."


def test_split_is_disjoint_and_known():
    names = [n for group in checkers.SPLIT.values() for n in group]
    assert len(names) == len(set(names)) and all(n in checkers.CHECKERS for n in names)
    assert checkers.split_of("short_40") == "held_out_parameter" and checkers.split_of("lowercase") == "train"
    # held-out families share no family with a trained preference
    trained = {checkers.get(n).family for n in checkers.SPLIT["train"]}
    assert not trained & {checkers.get(n).family for n in checkers.SPLIT["held_out_family"]}


def test_unknown_checker_names_the_field():
    with pytest.raises(InvalidInput, match="--preferences.*unknown preference checker 'nope'"):
        checkers.get("nope", "--preferences")
