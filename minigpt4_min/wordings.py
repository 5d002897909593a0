"""How a learner may ask: question wordings for the corpus and a HELD-OUT set (DESIGN.md §3).

MiniGPT-4's claim (arXiv 2304.10592 §4) is that the frozen LLM's language ability carries
over to images: Vicuna understands a question however it is worded. The miniature
"Vicuna of ShapesWorld" must too, within its world. So every question kind comes in many
wordings, and a separate set of wordings is HELD OUT: the corpus never uses them (a test
proves no held-out wording occurs in any corpus text, after `normalize`), and notebooks 01
and 05 grade the LLM and the chat on them, against the corpus's own wordings.

    >>> q = questions(sw.scene_at("test", 0), random.Random(0), "heldout")[0]
    >>> q.kind in KINDS
    True

Templates use `{s}` (shape), `{c}` (colour), `{w}` (a place: "on the left", "in the center"), `{ss}` (plural shape),
`{pic}` (picture / image / ...). Answers are in `answer(...)`, one plain style per kind:
"The circle is red.", "There is no square.", "Yes, there is a red circle."
"""
from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass

from . import grammar
from . import shapesworld as sw

# kinds graded by `evaluate.vqa_correct` (value kinds) or by yes / no / absent
KINDS = ("colour", "size", "position", "count", "background", "what_where", "yesno", "absent")
PICS = ("picture", "image", "scene", "photo")
PLURAL = {s: s + "s" for s in sw.SHAPES}

# ------------------------------------------------------------------ the corpus's wordings
CORPUS = {
    "colour": ["What color is the {s}?", "What colour is the {s}?", "What is the color of the {s}?",
               "What's the colour of the {s}?", "Which colour does the {s} have?",
               "Tell me what color the {s} is.", "What color does the {s} have?",
               "Do you know the colour of the {s}?", "Color of the {s}?", "{s} color?",
               "What color is the {s} in the {pic}?", "Name the colour of the {s}."],
    "size": ["What size is the {s}?", "Is the {s} small or large?", "How big is the {s}?",
             "Is the {s} big or small?", "What is the size of the {s}?", "How large is the {s}?",
             "Tell me the size of the {s}.", "Size of the {s}?", "Is the {s} large or small?",
             "How big is the {s} in the {pic}?"],
    "position": ["Where is the {c} {s}?", "Where is the {s}?", "Where can I find the {c} {s}?",
                 "In which part of the {pic} is the {c} {s}?", "Where is the {c} {s} located?",
                 "What is the position of the {s}?", "Where exactly is the {c} {s}?",
                 "Which side is the {s} on?", "Where does the {c} {s} sit?", "Location of the {s}?",
                 "Where in the {pic} is the {s}?"],
    "count": ["How many shapes are there?", "How many objects are in the {pic}?",
              "How many things can you see?", "Count the shapes.", "How many shapes do you see?",
              "What is the number of objects?", "How many shapes are in the {pic}?",
              "Number of shapes?", "How many objects are there in total?", "Count the objects in the {pic}."],
    "background": ["What color is the background?", "What colour is the background?",
                   "What is the colour of the background?", "Tell me the color of the background.",
                   "Say which colour the background has.", "What color is the backdrop?",
                   "Is the background black, gray or white?", "Background color?",
                   "What does the background look like?", "What color is behind the shapes?"],
    "what_where": ["What is {w}?", "What do you see {w}?", "Is there anything {w}?", "What shape is {w}?",
                   "Tell me what is {w}.", "Which object is {w}?", "What's {w}?", "What is there {w}?"],
    "yesno": ["Is there a {s}?", "Is there a {c} {s}?", "Is there a {s} in the {pic}?",
              "Is there a {c} {s} in the {pic}?", "Are there any {ss}?", "Are there any {c} {ss}?",
              "Do you see a {s}?", "Can you see a {c} {s}?", "Does the {pic} contain a {s}?",
              "Does the {pic} have a {c} {s}?", "Is a {s} in the {pic}?", "Any {ss} here?"],
}
# questions about a shape that may not be there reuse the colour / size / position wordings
CORPUS["absent"] = CORPUS["colour"] + CORPUS["size"] + [w for w in CORPUS["position"] if "{c}" not in w]

# ------------------------------------------------------------------ HELD OUT: never in the corpus
HELDOUT = {
    "colour": ["Which color is the {s}?", "The {s} is what color?", "Could you tell me the {s}'s colour?",
               "I wonder what colour the {s} is.", "What colour has the {s} got?"],
    "size": ["Would you say the {s} is large or small?", "The {s}, is it small or big?",
             "How would you describe the size of the {s}?", "Is that {s} a big one or a small one?"],
    "position": ["Where's the {c} {s}?", "Whereabouts is the {c} {s}?", "Where would I spot the {s}?",
                 "The {c} {s} is where?", "On what side of the {pic} is the {c} {s}?"],
    "count": ["How many objects do you count?", "What's the total number of shapes?",
              "Can you count how many shapes there are?", "How many shapes does this {pic} show?"],
    "background": ["What is the background color?", "What color would you say the background is?",
                   "The background is what colour?", "Which colour fills the background?"],
    "what_where": ["Which shape sits {w}?", "What can be found {w}?", "Anything {w}?",
                   "What have we got {w}?"],
    "yesno": ["Do I see a {c} {s} here?", "Is any {s} visible?", "Would there be a {s} somewhere?",
              "Is a {c} {s} present?", "Can a {s} be seen in the {pic}?"],
    "absent": ["Which color is the {s}?", "The {s} is what color?", "Where would I spot the {s}?",
               "Would you say the {s} is large or small?"],
}

# A SECOND held-out set, written after the first set's errors were read and before the corpus
# grammar (`grammar.py`) that answers them: the grammar's builder saw the first set's failures,
# never these, so accuracy on them is the unbiased check of the grammar. Never in the corpus.
LATE = {
    "colour": ["Tell me, what color is that {s}?", "Any idea what colour the {s} is?", "What color was the {s}?"],
    "size": ["Is the {s} tiny or huge?", "What's the size of that {s}?", "Big or small, the {s}?"],
    "position": ["Where did you see the {c} {s}?", "Where is the {s} placed?", "Tell me where the {c} {s} is."],
    "count": ["How many shapes can you find?", "How many items are in the {pic}?", "Count the things you see."],
    "background": ["Tell me the background's colour.", "Which color is behind everything?",
                   "How does the background look?"],
    "what_where": ["Tell me what you see {w}.", "Is something {w}?", "What lies {w}?"],
    "yesno": ["Do you notice a {c} {s}?", "Is there any {c} {s} in this {pic}?", "Can I find a {s} here?"],
    "absent": ["Tell me, what color is that {s}?", "What's the size of that {s}?", "Where is the {s} placed?"],
}
SPLITS = {"heldout": HELDOUT, "late": LATE}      # evaluation wordings; "corpus" is CORPUS

# Corpus wordings that contain a held-out one ("Is there anything on the left?" holds
# "Anything on the left?"): `corpus.sample_doc` drops every document that would use them,
# so they never reach the corpus (tests check both).
SHADOWED = ("Is there anything {w}?",)

POLITE = ("", "", "", "Can you tell me: ", "Please, ", "Quick question: ", "Hey, ", "I'd like to know: ",
          "Hi! ", "Excuse me, ")


def normalize(text: str) -> str:
    """Lower case, colour == color, punctuation and repeated spaces dropped: two wordings
    that differ only so are the same wording."""
    t = text.lower().replace("colour", "color")
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", t).split())


def _template_regex(template: str) -> re.Pattern:
    slots = {"{s}": r"\w+", "{c}": r"\w+", "{w}": r"\w+ the \w+", "{ss}": r"\w+", "{pic}": r"\w+"}
    out = re.escape(normalize(template.replace("{", "QQ").replace("}", "QQ")))
    for k in slots:                     # normalize() keeps the QQ..QQ marks, lower-cased
        out = out.replace(re.escape(normalize(k.replace("{", "QQ").replace("}", "QQ"))), slots[k])
    return re.compile(rf"(?:^| ){out}(?: |$)")


@functools.cache
def heldout_patterns() -> tuple[re.Pattern, ...]:
    """One regex per held-out wording (both sets), over `normalize`d text, any slot filling."""
    return tuple(_template_regex(t) for split in SPLITS.values() for ts in split.values() for t in ts)


@functools.cache
def _any_heldout() -> re.Pattern:
    """One alternation of all the held-out patterns: one pass per text."""
    return re.compile("|".join(f"(?:{p.pattern})" for p in heldout_patterns()))


def uses_heldout(text: str) -> bool:
    """Does `text` contain a held-out wording (whatever shape, colour or place fills it)?"""
    return bool(_any_heldout().search(normalize(text)))


def _clashes(template: str) -> bool:
    """Does `template`, after any polite opening, hold a held-out wording? (Slots are read
    as any word, so the first and last filling of each slot stand for all of them.)"""
    fills = [dict(s=s, c=c, w=sw.POSITION_PHRASE[p], ss=PLURAL[s], pic=pic) for s, c, p, pic in
             ((sw.SHAPES[0], next(iter(sw.COLOURS)), sw.POSITIONS[0], PICS[0]),
              (sw.SHAPES[-1], list(sw.COLOURS)[-1], sw.POSITIONS[-1], PICS[-1]))]
    return any(uses_heldout(pre + template.format(**f)) for f in fills for pre in set(POLITE))


@functools.cache
def grammar_wordings(kind: str) -> tuple[str, ...]:
    """The grammar's wordings of `kind` (grammar.py) that hold no held-out one: the corpus
    asks in these too (made on first use: checking them all takes a second or two). Absent
    shapes are asked about in the colour / size / position wordings, as in CORPUS."""
    if kind == "absent":
        return (grammar_wordings("colour") + grammar_wordings("size")
                + tuple(t for t in grammar_wordings("position") if "{c}" not in t))
    return tuple(t for t in grammar.templates(kind) if t not in CORPUS[kind] and not _clashes(t))


@functools.cache
def yes_no_wordings(coloured: bool = False) -> tuple[str, ...]:
    """Every corpus wording of a yes / no question, CORPUS's and the grammar's (`coloured`:
    those that name a colour, "Is there a {c} {s}?")."""
    every = tuple(CORPUS["yesno"]) + tuple(grammar_wordings("yesno"))
    return tuple(w for w in every if "{c}" in w) if coloured else every


GRAMMAR_SHARE = 0.65     # of corpus questions worded by the grammar; the rest by CORPUS's own


def fill(template: str, rng: random.Random, s: str = "", c: str = "", p: str = "") -> str:
    w = sw.POSITION_PHRASE.get(p, "")
    return template.format(s=s, c=c, w=w, ss=PLURAL.get(s, s + "s"), pic=rng.choice(PICS))


def vary(q: str, rng: random.Random, polite: bool = True) -> str:
    """A learner's surface variation: a polite opening, lower case, no question mark, a typo."""
    if polite and rng.random() < 0.3:
        pre = rng.choice(POLITE)
        q = pre + (q[0].lower() + q[1:] if pre else q)
    r = rng.random()
    if r < 0.15:
        q = q.lower()
    elif r < 0.25:
        q = q.rstrip("?.")
    if rng.random() < 0.05:             # one typo: two neighbouring letters swapped
        words = q.split()
        i = rng.randrange(len(words))
        w = words[i]
        if len(w) > 4 and w.isalpha():
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            q = " ".join(words)
    return q


# ------------------------------------------------------------------ answers (one style per kind)
def _is(n: int) -> str:
    return "is" if n == 1 else "are"


def count_answer(n: int) -> str:
    return f"There {_is(n)} {sw.COUNT_WORDS[n]} shape{'s' if n != 1 else ''}."


def object_at(scene: sw.Scene, place: str) -> sw.Obj | None:
    return next((o for o in scene.objects if o.position == place), None)


@dataclass(frozen=True)
class Asked:
    """One question with its answer and ground truth (`value`: the true colour / size /
    position / count word / background; 'yes' / 'no'; 'absent'; a place's shape or 'nothing')."""
    text: str
    answer: str
    kind: str
    value: str
    shape: str = ""          # the object the question is about ("" if none): follow-ups use it


def attribute_question(scene: sw.Scene, kind: str, shape: str, wording: str, rng: random.Random,
                       colour: str = "") -> Asked:
    """colour / size / position of `shape` (present once, or absent -> 'There is no ...')."""
    objs = [o for o in scene.objects if o.shape == shape and (not colour or o.colour == colour)]
    text = fill(wording, rng, s=shape, c=colour)
    if not objs:
        what = f"{colour} {shape}" if colour else shape
        return Asked(text, f"There is no {what}.", "absent", "absent", shape)
    o = objs[0]
    name = f"{o.colour} {shape}" if "{c}" in wording else shape
    if kind == "colour":
        return Asked(text, f"The {shape} is {o.colour}.", kind, o.colour, shape)
    if kind == "size":
        return Asked(text, f"The {shape} is {o.size}.", kind, o.size, shape)
    return Asked(text, f"The {name} is {sw.POSITION_PHRASE[o.position]}.", "position", o.position, shape)


def ask(scene: sw.Scene, kind: str, rng: random.Random, split: str = "corpus",
        negative_from: str = "random") -> Asked | None:
    """A question of `kind` about `scene`, in a wording of `split` ('corpus', 'heldout', 'late');
    None when the scene allows no such question (e.g. every shape occurs twice). A "no" to a
    yes / no question is drawn as `yes_no`'s `negative_from` says."""
    if split != "corpus" and split not in SPLITS:
        raise ValueError(f"unknown wording split {split!r}; expected 'corpus' or one of {list(SPLITS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
    if split == "corpus":
        grammar_made = rng.random() < GRAMMAR_SHARE
        wording = rng.choice(grammar_wordings(kind) if grammar_made else CORPUS[kind])
    else:
        wording = rng.choice(SPLITS[split][kind])
    counts = Counter(o.shape for o in scene.objects)
    unique = [o for o in scene.objects if counts[o.shape] == 1]
    if kind in ("colour", "size", "position"):
        if not unique:
            return None
        o = rng.choice(unique)
        if kind == "position" and "{c}" not in wording:
            return attribute_question(scene, kind, o.shape, wording, rng)
        return attribute_question(scene, kind, o.shape, wording, rng, colour=o.colour if kind == "position" else "")
    if kind == "absent":
        missing = [s for s in sw.SHAPES if not counts[s]]
        if not missing:
            return None
        # the shape is not there: "There is no ...", whichever attribute the wording asks for
        return attribute_question(scene, "colour", rng.choice(missing), wording, rng)
    if kind == "count":
        n = len(scene.objects)
        return Asked(fill(wording, rng), count_answer(n), kind, sw.COUNT_WORDS[n])
    if kind == "background":
        return Asked(fill(wording, rng), f"The background is {scene.background}.", kind, scene.background)
    if kind == "what_where":
        place = rng.choice(sw.POSITIONS)
        o = object_at(scene, place)
        text = fill(wording, rng, p=place)
        if o is None:
            return Asked(text, f"There is nothing {sw.POSITION_PHRASE[place]}.", kind, "nothing")
        return Asked(text, f"There is a {o.phrase()} {sw.POSITION_PHRASE[place]}.", kind, o.shape, o.shape)
    if kind == "yesno":
        return yes_no(scene, rng, wording, rng.random() < 0.5, negative_from)
    raise AssertionError(kind)          # every kind of KINDS is handled above


def yes_no(scene: sw.Scene, rng: random.Random, wording: str, positive: bool,
           negative_from: str = "random") -> Asked:
    """'Is there a (colour) shape?' answered yes / no. Negatives: a shape that is absent
    ('random'), or, when the wording names a colour, a present shape in another colour
    ('adversarial', POPE's co-occurring kind)."""
    o = rng.choice(scene.objects)
    with_colour = "{c}" in wording
    if positive:
        text = fill(wording, rng, s=o.shape, c=o.colour)
        return Asked(text, f"Yes, there is a {o.colour} {o.shape}.", "yesno", "yes", o.shape)
    missing = [s for s in sw.SHAPES if s not in scene.shapes]
    if with_colour and (negative_from == "adversarial" or not missing):
        wrong = [c for c in sw.COLOURS if not any(p.shape == o.shape and p.colour == c for p in scene.objects)]
        c = rng.choice(wrong)
        return Asked(fill(wording, rng, s=o.shape, c=c), f"No, there is no {c} {o.shape}.", "yesno", "no", o.shape)
    if not missing:                      # every shape is there (3 objects cannot: 5 shapes)
        raise ValueError(f"no absent shape in {scene}")
    s = rng.choice(missing)
    c = rng.choice(list(sw.COLOURS))
    return Asked(fill(wording, rng, s=s, c=c), f"No, there is no {c + ' ' if with_colour else ''}{s}.",
                 "yesno", "no", s)


POPE_WORDINGS = (("random", "Is there a {s} in the image?"),
                 ("adversarial", "Is there a {c} {s} in the image?"))


def pope_questions(scenes: list[sw.Scene], seed: int = 0) -> list[tuple[int, str, Asked]]:
    """POPE's probe (Li et al., 2023) in ShapesWorld: per scene, one "yes" and one "no"
    question in each setting ('random': the "no" is about an absent shape; 'adversarial':
    about a present shape in another colour), as (scene index, setting, question)."""
    rng = random.Random(seed)
    return [(i, setting, yes_no(s, rng, wording, positive, negative_from=setting))
            for i, s in enumerate(scenes) for setting, wording in POPE_WORDINGS
            for positive in (True, False)]


def questions(scene: sw.Scene, rng: random.Random, split: str = "heldout",
              kinds: tuple[str, ...] = KINDS) -> list[Asked]:
    """One question of each kind the scene allows, in `split`'s wordings (evaluation sets)."""
    return [q for q in (ask(scene, k, rng, split) for k in kinds) if q is not None]
