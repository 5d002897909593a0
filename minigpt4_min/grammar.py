"""A small grammar of question wordings for the miniature LLM's corpus (issue 12, DESIGN.md §3).

MiniGPT-4 (arXiv 2304.10592 §4) relies on Vicuna understanding a question however it is
asked. A dozen fixed wordings per question kind taught our miniature LLM those strings,
not the questions: held-out wordings that put the words in another order ("The star is
what color?"), a possessive ("the triangle's colour"), a hedge ("Would you say ...") or a
passive ("Can a square be seen ...") were answered 0.56-0.80 of the time, against 0.97
for the corpus's own. So the corpus also asks each kind in the ways a chat model meets
in text, built from parts:

* the object referred to in several ways (`REFS`: "the {s}", "that {s}", "the {s} in the {pic}");
* word orders: the question word first, in place ("The {s} has what colour?"), after a
  topic ("As for the {s}, ..."), in an embedded question ("Do you know where the {s} is?");
* possessives, contractions, hedges ("Do you think ...") and passives ("Is a {s} shown?").

`wordings.CORPUS` adds every template made here that is not a held-out wording (both
held-out sets are dropped from it, whatever fills the slots; tests check it), so held-out
wordings stay a test of generalisation: the same kinds of change, other words.

    >>> "The {s} has what colour?" in templates("colour")
    True
"""
from __future__ import annotations

from itertools import product

COL = ("color", "colour")
REFS = ("the {s}", "that {s}", "this {s}", "the {s} in the {pic}", "the {s} here", "the {s} you see")
SHORT_REFS = ("the {s}", "that {s}")              # the ones a possessive 's reads well after
POS_REFS = ("the {s}", "the {c} {s}", "that {c} {s}", "the {c} {s} in the {pic}", "the {c} {s} here")
THINGS = ("shapes", "objects", "things")
# heads of an embedded question: (head, end mark)
HEADS = (("Tell me", "."), ("Please tell me", "."), ("I'd like to know", "."), ("I want to know", "."),
         ("Can you say", "?"), ("Do you know", "?"), ("Could you tell me", "?"), ("Can you tell me", "?"),
         ("Say", "."), ("Let me know", "."))
TOPICS = ("{R}: {q}", "{R} - {q}", "As for {r}, {q}", "About {r}: {q}", "And {r}, {q}", "Now {r}: {q}")


def _cap(t: str) -> str:
    return t[0].upper() + t[1:]


def _topicalised(refs, questions) -> list[str]:
    """'As for the {s}, what colour is it?': a topic, then a question about 'it'."""
    return [t.format(R=_cap(r), r=r, q=q) for t, r, q in product(TOPICS, refs, questions)]


def _embedded(clauses) -> list[str]:
    """'Do you know what colour the {s} is?': an indirect question after a head."""
    return [f"{h} {c}{end}" for (h, end), c in product(HEADS, clauses)]


def _colour() -> list[str]:
    out = []
    for col, r in product(COL, REFS):
        out += [f"What {col} is {r}?", f"What is the {col} of {r}?", f"What's the {col} of {r}?",
                f"{_cap(r)} has what {col}?", f"{_cap(r)} comes in what {col}?",
                f"Which {col} does {r} have?", f"What {col} does {r} have?"]
    for col, r in product(COL, SHORT_REFS):
        out += [f"What is {r}'s {col}?", f"{_cap(r)}'s {col}?", f"Tell me {r}'s {col}.", f"And {r}'s {col}?"]
    out += _topicalised(REFS, [f"what {col} is it?" for col in COL] + ["which colour does it have?"])
    out += _embedded(f"what {col} {r} is" for col, r in product(COL, REFS))
    return out


def _size() -> list[str]:
    out = []
    for r in REFS:
        out += [f"What size is {r}?", f"What is the size of {r}?", f"How big is {r}?", f"How large is {r}?",
                f"Is {r} big or small?", f"Is {r} small or large?", f"{_cap(r)} is how big?",
                f"{_cap(r)} has what size?", f"Do you think {r} is big or small?",
                f"Is {r} a large shape or a small shape?"]
    for r in SHORT_REFS:
        out += [f"What is {r}'s size?", f"{_cap(r)}'s size?", f"Tell me {r}'s size.", f"How big is {r}, roughly?"]
    out += _topicalised(REFS, ["how big is it?", "what size is it?", "is it big or small?", "is it large or small?"])
    out += _embedded([f"how big {r} is" for r in REFS] + [f"what size {r} is" for r in REFS]
                     + [f"whether {r} is big or small" for r in REFS])
    return out


def _position() -> list[str]:
    out = []
    for r in POS_REFS:
        out += [f"Where is {r}?", f"Where is {r} located?", f"Where can I find {r}?", f"Where can you see {r}?",
                f"In which part of the {{pic}} is {r}?", f"Which part of the {{pic}} is {r} in?",
                f"On which side is {r}?", f"{_cap(r)} sits where?", f"{_cap(r)} appears where?",
                f"Where exactly is {r}?", f"Do you know where {r} sits?"]
    for r in ("the {s}", "the {c} {s}"):
        out += [f"What is {r}'s position?", f"{_cap(r)}'s location?", f"Tell me {r}'s position."]
    out += _topicalised(POS_REFS, ["where is it?", "where is it located?", "which side is it on?"])
    out += _embedded(f"where {r} is" for r in POS_REFS)
    return out


def _count() -> list[str]:
    out = []
    for t in THINGS:
        out += [f"How many {t} are there?", f"How many {t} are in the {{pic}}?", f"How many {t} can you see?",
                f"How many {t} do you see?", f"What is the number of {t}?", f"Count the {t}.",
                f"Count the {t} in the {{pic}}.", f"Number of {t}?", f"The {{pic}} has how many {t}?",
                f"There are how many {t}?", f"How many {t} does the {{pic}} contain?", f"How many {t} are shown?",
                f"How many {t} in total?", f"Do you know the number of {t}?"]
        out += _embedded([f"how many {t} there are", f"how many {t} the {{pic}} has"])
    return out


def _background() -> list[str]:
    out = []
    for col in COL:
        out += [f"What {col} is the background?", f"What is the {col} of the background?",
                f"What's the background's {col}?", f"The background has what {col}?",
                f"Which {col} does the background have?", f"What {col} is the {{pic}}'s background?",
                f"What {col} is behind the shapes?", f"Background {col}?", f"What {col} is the backdrop?",
                f"The background: what {col} is it?", f"As for the background, what {col} is it?"]
        out += _embedded([f"what {col} the background is", f"which {col} the background has"])
    out += ["What does the background look like?", "Is the background black, gray or white?",
            "Is the background dark or light?", "Describe the background's colour."]
    return out


def _what_where() -> list[str]:
    out = ["What is {w}?", "What do you see {w}?", "What shape is {w}?", "Which object is {w}?", "What's {w}?",
           "What is there {w}?", "What is shown {w}?", "What can you see {w}?", "What appears {w}?",
           "Which thing is {w}?", "Looking {w}, what do you see?", "And {w}: what is there?",
           "What object do you see {w}?", "Is anything shown {w}?", "Do you see something {w}?"]
    out += _embedded(["what is {w}", "what you see {w}", "which shape is {w}"])
    return out


def _yes_no() -> list[str]:
    out = []
    for a, ss in (("a {s}", "{ss}"), ("a {c} {s}", "{c} {ss}")):
        out += [f"Is there {a}?", f"Is there {a} in the {{pic}}?", f"Are there any {ss}?", f"Do you see {a}?",
                f"Can you see {a}?", f"Can you spot {a}?", f"Does the {{pic}} contain {a}?",
                f"Does the {{pic}} have {a}?", f"Does the {{pic}} show {a}?", f"Is {a} in the {{pic}}?",
                f"Is {a} shown?", f"Is {a} there?", f"Is there {a} anywhere?", f"Do you think there is {a}?",
                f"Any {ss} in the {{pic}}?", f"Is {a} part of the {{pic}}?", f"Are any {ss} shown?"]
        out += _embedded([f"if there is {a}", f"whether the {{pic}} has {a}", f"if you see {a}"])
    return out


KIND_GRAMMAR = {"colour": _colour, "size": _size, "position": _position, "count": _count,
                "background": _background, "what_where": _what_where, "yesno": _yes_no}


def templates(kind: str) -> list[str]:
    """Every template the grammar makes for `kind`, without duplicates, in a fixed order
    (absent shapes are asked in colour / size / position wordings: `wordings.grammar_wordings`)."""
    if kind not in KIND_GRAMMAR:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {list(KIND_GRAMMAR)}")
    return list(dict.fromkeys(KIND_GRAMMAR[kind]()))
