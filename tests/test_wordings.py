"""The corpus speaks like a chat model, and the held-out wordings are really held out."""
import random
import re

import pytest

from minigpt4_min import corpus, grammar
from minigpt4_min import shapesworld as sw
from minigpt4_min import wordings as wd
from minigpt4_min.conversation import SYSTEM
from minigpt4_min.evaluate import accuracy_by_kind, asked_correct


@pytest.fixture(scope="module")
def docs():
    return corpus.documents(3000, seed=11)


def _every_filling(template):
    for s in sw.SHAPES:
        for c in sw.COLOURS:
            for p in sw.POSITIONS:
                for pic in wd.PICS:
                    yield template.format(s=s, c=c, w=sw.POSITION_PHRASE[p], ss=wd.PLURAL[s], pic=pic)


def test_heldout_patterns_find_their_own_wordings_in_any_form():
    """The check below could fail: each held-out wording is found, filled any way,
    inside a longer sentence, in lower case, with colour for color and no question mark."""
    for kind, templates in [kt for split in wd.SPLITS.values() for kt in split.items()]:
        for t in templates:
            for text in list(_every_filling(t))[::37]:
                assert wd.uses_heldout(text), (kind, text)
                assert wd.uses_heldout("Please, " + text.lower().rstrip("?").replace("color", "colour"))
    assert not wd.uses_heldout("What color is the circle?")


def test_no_corpus_wording_contains_a_heldout_one():
    """Exhaustive over the corpus's question templates, every filling and polite opening."""
    templates = [t for ts in wd.CORPUS.values() for t in ts]
    templates += list(corpus.FOLLOW_SAME) + [t for ts in corpus.FOLLOW_ATTR.values() for t in ts]
    templates += list(corpus.DESCRIBE) + list(corpus.CAPTION) + [q for q, _ in corpus.OUT_OF_WORLD]
    clash = {t for t in templates for text in _every_filling(t) for pre in wd.POLITE if wd.uses_heldout(pre + text)}
    assert clash == set(wd.SHADOWED)          # ...and those the corpus guard drops (next test)


def test_grammar_wordings_hold_no_heldout_one_and_the_filter_could_fail():
    """The grammar's wordings (grammar.py), a sample of fillings with every polite opening; the
    grammar does make held-out wordings of its own accord, and those never reach the corpus."""
    made = {k: wd.grammar_wordings(k) for k in wd.KINDS}
    for kind, ts in made.items():
        assert len(ts) >= 30, kind                                    # many ways to ask each kind
        for t in ts:
            for text in list(_every_filling(t))[::97]:
                assert not any(wd.uses_heldout(pre + text) for pre in wd.POLITE), (kind, t, text)
    raw = grammar.templates("position")
    assert "Tell me where the {c} {s} is." in raw                     # a LATE wording, made by the grammar...
    assert "Tell me where the {c} {s} is." not in made["position"]    # ...and dropped
    assert "The {s} has what colour?" in made["colour"] and "Is a {s} shown?" in made["yesno"]
    with pytest.raises(ValueError, match="unknown question kind"):
        grammar.templates("shade")
    with pytest.raises(ValueError, match="unknown wording split 'test'"):
        wd.ask(sw.split("val", 1)[0], "colour", random.Random(0), "test")


def test_sampled_corpus_never_uses_heldout_wordings_nor_image_framing(docs):
    """Both corpora the shipped LLM learnt from (curriculum.py): today's and the first."""
    from minigpt4_min import corpus_first
    for d in docs + corpus_first.documents(2000, seed=11):
        assert not wd.uses_heldout(d), d
        for f in ("<Img>", "<ImageHere>", "ImageContent", SYSTEM, SYSTEM[:40]):
            assert f not in d
        assert "<img" not in d.lower()
        assert "is there anything" not in d.lower()         # wd.SHADOWED: dropped by the guard


def test_corpus_has_a_chat_models_variety(docs):
    text = "\n".join(docs)
    humans = [h for d in docs for h in re.findall(r"###Human: ?(.*?) ?###Assistant", d, re.S)]
    assert len({wd.normalize(h) for h in humans}) > 2000       # the old corpus: one wording per kind
    for marker in ("colour", "color", "picture", "image", "photo", "Can you tell me", "Please, ",
                   "There is no ", "Yes, there is", "No, there is no", "And the ", "Where is it",
                   "Once upon a time", "Buy the new", "I only know about the shapes", "\n"):
        assert marker in text, marker
    assert any(h == h.lower() and h[0].isalpha() for h in humans)                 # lower case
    assert any(not h.endswith(("?", ".", "!", "]", ")")) for h in humans)        # no question mark
    turns = [d.count("###Human:") for d in docs if "###Human:" in d]
    assert sum(t >= 5 for t in turns) > 0.25 * len(turns)                        # long enough for 5 turns
    answers = [a for d in docs for a in re.findall(r"###Assistant: ?(.*?)###", d, re.S)]
    yes = sum(a.startswith("Yes,") for a in answers)
    no = sum(a.startswith("No,") for a in answers)
    assert 0.4 < yes / (yes + no) < 0.6                                          # balanced yes / no
    assert not any(f in a for a in answers for f in ("free download", "stock image", "none none"))


def test_drills_say_no_to_a_present_shape_in_another_colour():
    """Curriculum phase 5's corpus (`corpus.Drilled`) asks POPE's adversarial kind ("Is there a
    red square?" with a blue square there) and answers it truly; today's corpus says "no" to
    absent shapes only. Scenes are read back from their notes."""
    notes = re.compile(r"\b((?:(?:left|top|center|bottom|right) \w+ \w+ \w+ ){5}\w+ \w+)\b")

    def nos(docs):
        adversarial = shape_absent = 0
        for d in docs:
            m = notes.search(d)
            if m is None or "###Human:" not in d:
                continue
            w = m.group(1).split()
            there = {(w[i + 2], w[i + 3]) for i in range(0, 20, 4) if w[i + 3] != sw.NONE_WORD}
            for c, s in re.findall(r"###Assistant: ?No, there is no (\w+) (\w+)\.", d):
                assert (c, s) not in there, d                 # a "no" is never false
                adversarial += s in {shape for _, shape in there}
                shape_absent += s not in {shape for _, shape in there}
        return adversarial, shape_absent

    drilled = corpus.Drilled.documents(1500, seed=11)
    adversarial, shape_absent = nos(drilled)
    assert adversarial > shape_absent > 100, (adversarial, shape_absent)      # most "no"s of that kind
    assert nos(corpus.documents(1500, seed=11))[0] == 0
    for d in drilled:
        assert not wd.uses_heldout(d) and not any(f in d for f in corpus.FORBIDDEN + (SYSTEM[:40],)), d


def test_every_question_is_answered_truly():
    rng = random.Random(0)
    for split in ("corpus", "heldout", "late"):
        asked = [q for s in sw.split("val", 200) for q in wd.questions(s, rng, split)]
        assert {q.kind for q in asked} == set(wd.KINDS)
        assert accuracy_by_kind([q.answer for q in asked], asked)["all"] == 1.0   # its own answer is right
    s = sw.Scene((sw.Obj("circle", "red", "large", "left"),), "gray")
    q = wd.attribute_question(s, "colour", "square", "What color is the {s}?", rng)
    assert (q.kind, q.answer) == ("absent", "There is no square.")
    assert not asked_correct("The square is red.", q) and asked_correct("There is no square.", q)
    q = wd.attribute_question(s, "colour", "circle", "What color is the {s}?", rng)
    assert asked_correct("The circle is red.", q) and not asked_correct("The circle is red or blue.", q)
    neg = wd.yes_no(s, rng, "Is there a {c} {s}?", positive=False, negative_from="adversarial")
    assert neg.text.endswith("circle?") and "red" not in neg.text and neg.value == "no"


def test_follow_ups_refer_to_the_previous_turn():
    rng = random.Random(2)
    s = sw.Scene((sw.Obj("circle", "red", "large", "left"), sw.Obj("star", "blue", "small", "right")), "white")
    last = wd.attribute_question(s, "colour", "circle", "What color is the {s}?", rng)
    seen = set()
    for _ in range(200):
        f = corpus._follow_up(s, last, rng)
        assert asked_correct(f.answer, f), f
        if f.shape == "circle":                      # "where is it?" / "how big is it?": the circle
            assert f.kind in ("size", "position") and "circle" in f.answer
        seen.add(f.text.split()[0])
    assert {"And", "Where", "How"} & seen
