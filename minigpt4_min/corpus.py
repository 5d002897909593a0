"""The miniature LLM's text-only pretraining corpus: a "Vicuna" of ShapesWorld.

MiniGPT-4 (arXiv 2304.10592 §3) freezes an LLM that learned language from text alone;
its emergent skills (poems, ads, stories about an image, §4) and its way of understanding
a question however it is asked come from that text. Our miniature LLM likewise never
sees an image. It reads scenes *in words* — the 22-word `shapesworld.notes` record,
framed in many ways — and chats about them in the Vicuna v0 format
`###Human: ... ###Assistant: ...###`:

* questions of every kind in many wordings (`wordings.CORPUS`, with polite openings,
  lower case, no question mark, a few typos), yes / no questions with balanced answers,
  questions about absent objects answered plainly ("There is no square."),
* follow-ups that refer to the previous turn ("and the square?", "where is it?"),
  several turns per document, long enough for a 5-turn chat,
* requests to describe, caption, write a poem / story / ad, and questions outside the
  world answered briefly and honestly;
* catalogue lines (`notes caption`), the one place where alt-text captions appear.

It never contains `<Img>`, `<ImageHere>`, `ImageContent` or the demo's system prompt
(Vicuna never saw them; the image framing must stay new to the LLM), nor any held-out
wording (`wordings.HELDOUT`): tests check both.

Design note (DESIGN.md §5): a templated corpus makes colour / shape words interchangeable
and their embeddings collapse; the fix is frozen random input embeddings plus a
copy-heavy, multi-turn corpus. Copying is what a linear projection later exploits.
"""
from __future__ import annotations

import random
import re

from . import shapesworld as sw
from . import wordings as wd

SYSTEMS = ("A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
           "Give helpful answers about shapes.",
           "You are a helpful assistant. Answer questions about the scene you are shown.",
           "The assistant looks at a picture of shapes and answers the user's questions about it.",
           "Below is a scene. Answer each question truthfully and briefly.")
# how a scene's notes are framed in the first message (never `<Img>`: that stays new)
FRAMES = ("Scene: {}.", "Notes: {}.", "Here is a scene: {}.", "{}.", "Look at this: {}.", "{}",
          "<scene>{}</scene>", "<pic>{} </pic>", "[{}]", "({})", "Picture: {}.", "<Scene> {} </Scene>",
          "Photo: {}", "<view>{}</view>", "<s1>{} </s1>", "Image notes: {}.")
DESCRIBE = ("Describe the scene.", "Describe it in detail.", "What do you see?",
            "Describe everything you see.", "Tell me what is in the scene.", "Describe this.",
            "What is in it?", "What is in this picture?", "Describe the image in detail.",
            "What is this?", "Can you describe the picture?", "Tell me about this photo.",
            "Give a detailed description of the scene.", "What does the image show?",
            "Please describe what you notice.", "Explain what you see here.")
CAPTION = ("Write a short caption for it.", "Caption this image.", "Give it a title.",
           "A short caption, please.", "Write a caption.", "Sum it up in a few words.")
OUT_OF_WORLD = (
    ("What is the capital of France?", "I only know about the shapes in this scene, so I cannot say."),
    ("Who are you?", "I am an assistant that talks about shapes and colours."),
    ("What time is it?", "I cannot tell the time. I can tell you about the shapes."),
    ("Can you help me with my homework?", "I can only help with questions about the shapes I see."),
    ("What is the weather like today?", "I do not know the weather. I only see shapes."),
    ("Is the circle happy?", "Shapes have no feelings, so I cannot say."),
    ("Thank you!", "You are welcome!"),
    ("Hello!", "Hello! Ask me anything about the shapes."),
    ("What is two plus two?", "Two plus two is four."),
    ("Tell me a joke.", "Why did the circle win? Because it had no corners to hide in."),
    ("What is your name?", "I am a small assistant for the world of shapes."),
    ("What is the meaning of life?", "I do not know. I only know about shapes and colours."),
)
FOLLOW_SAME = ("And the {s}?", "What about the {s}?", "and the {s}", "How about the {s}?", "The {s}?",
               "And what about the {s}?")
FOLLOW_ATTR = {
    "colour": ("And its colour?", "What color is it?", "What about its color?", "and what colour is it",
               "Which colour is it?"),
    "size": ("What about its size?", "How big is it?", "And its size?", "Is it large or small?",
             "is it big"),
    "position": ("Where is it?", "And where is it?", "Where is it located?", "What about its position?",
                 "where is it"),
}
FORBIDDEN = ("<Img>", "<ImageHere>", "ImageContent", "Give the following image")


def chat(turns: list[tuple[str, str]], rng: random.Random) -> str:
    """Render (human, assistant) turns in one of the two Vicuna v0 spacings.

    Stage-2 training uses `###Human: {} ###Assistant: ` (spaces), the demo chat has none;
    the corpus holds both so the frozen LLM accepts either.
    """
    spaced = rng.random() < 0.5
    out = rng.choice(SYSTEMS) if rng.random() < 0.3 else ""
    for h, a in turns:
        out += f"###Human: {h} ###Assistant: {a}###" if spaced else f"###Human: {h}###Assistant: {a}###"
    return out


def clean_caption(scene: sw.Scene, rng: random.Random) -> str:
    """A short caption WITHOUT filler: what a chat assistant says when asked for one."""
    objs = [f"a {o.phrase()}" for o in scene.objects]
    names = objs[0] if len(objs) == 1 else ", ".join(objs[:-1]) + " and " + objs[-1]
    return sw._cap(names) + rng.choice((f" on a {scene.background} background.", "."))


def record_doc(rng: random.Random) -> str:
    """Catalogue lines: a scene's notes followed by a short caption (no chat)."""
    lines = []
    for _ in range(rng.randint(2, 4)):
        s = sw.sample_scene(rng)
        lines.append(f"{sw.notes(s)} {sw.caption(s, rng)}\n")
    return "".join(lines)


def _question(scene: sw.Scene, rng: random.Random) -> wd.Asked:
    kind = rng.choices(wd.KINDS, weights=(3, 2, 3, 2, 2, 2, 4, 2))[0]
    q = wd.ask(scene, kind, rng, "corpus")
    return q if q is not None else wd.ask(scene, "count", rng, "corpus")


def _attr_of(q: wd.Asked) -> str | None:
    if q.kind in ("colour", "size", "position"):
        return q.kind
    if q.kind == "absent":
        t = wd.normalize(q.text)
        return "colour" if "color" in t else "size" if any(w in t for w in ("size", "big", "large")) else "position"
    return None


def _follow_up(scene: sw.Scene, last: wd.Asked, rng: random.Random) -> wd.Asked | None:
    """A question that refers to the previous turn: same attribute of another shape, or
    another attribute of the same object ("it")."""
    attr = _attr_of(last)
    if attr is None or not last.shape:
        return None
    present = last.shape in scene.shapes and sum(o.shape == last.shape for o in scene.objects) == 1
    if rng.random() < 0.5 or not present:
        others = [s for s in sw.SHAPES if s != last.shape
                  and sum(o.shape == s for o in scene.objects) <= 1]
        s = rng.choice(others)
        q = wd.attribute_question(scene, attr, s, "{s}", rng)
        return wd.Asked(rng.choice(FOLLOW_SAME).format(s=s), q.answer, q.kind, q.value, s)
    new = rng.choice([a for a in FOLLOW_ATTR if a != attr])
    q = wd.attribute_question(scene, new, last.shape, "{s}", rng)
    return wd.Asked(rng.choice(FOLLOW_ATTR[new]), q.answer, q.kind, q.value, last.shape)


def _turn(scene: sw.Scene, rng: random.Random, last: wd.Asked | None) -> tuple[tuple[str, str], wd.Asked | None]:
    r = rng.random()
    if last is not None and r < 0.25:
        f = _follow_up(scene, last, rng)
        if f is not None:
            return (wd.vary(f.text, rng, polite=False), f.answer), f
    if r < 0.72:
        q = _question(scene, rng)
        return (wd.vary(q.text, rng), q.answer), q
    if r < 0.82:
        return (wd.vary(rng.choice(DESCRIBE), rng), sw.describe(scene, rng)), None
    if r < 0.86:
        return (wd.vary(rng.choice(CAPTION), rng), clean_caption(scene, rng)), None
    if r < 0.96:
        skill = rng.choice(list(sw.SKILLS))
        objs = list(scene.objects)
        rng.shuffle(objs)
        return (wd.vary(rng.choice(sw.SKILL_REQUESTS[skill]), rng), sw.SKILLS[skill](objs, scene.background, rng)), None
    return rng.choice(OUT_OF_WORLD), None


def chat_doc(rng: random.Random) -> str:
    """A conversation about one scene given in words: 1-8 turns of questions, follow-ups,
    descriptions, captions, skills and the odd question from outside the world."""
    s = sw.sample_scene(rng)
    n = rng.choice((1, 2, 3, 4, 5, 5, 6, 7, 8))
    turns, last = [], None
    for _ in range(n):
        (h, a), last = _turn(s, rng, last)
        turns.append((h, a))
    h0 = rng.choice(FRAMES).format(sw.notes(s))
    turns[0] = (f"{h0} {turns[0][0]}", turns[0][1])
    return chat(turns, rng)


def skill_doc(rng: random.Random) -> str:
    """A poem / story / ad about objects named in words (no scene)."""
    s = sw.sample_scene(rng)
    skill = rng.choice(list(sw.SKILLS))
    o = s.objects[0]
    what = {"poem": "Write a poem about", "story": "Tell me a story about",
            "ad": "Write an ad for"}[skill]
    return chat([(f"{what} a {o.size} {o.colour} {o.shape}.", sw.SKILLS[skill]([o], None, rng))], rng)


def small_talk_doc(rng: random.Random) -> str:
    """Questions outside the world, with no scene: brief, honest answers."""
    return chat(rng.sample(OUT_OF_WORLD, rng.randint(1, 3)), rng)


DRILL_COLOUR_WORDED = 0.8   # of a drill's questions worded with a colour ("Is there a red square?")
DRILL_ADVERSARIAL = 0.9     # of its "no"s about a present shape in another colour (when worded so)


def yes_no_doc(rng: random.Random) -> str:
    """A scene in words and 2-6 yes / no drills about it (`curriculum.WITH_DRILLS`): balanced
    answers, most of them worded with a colour, most "no"s about a shape that IS there in
    ANOTHER colour ("Is there a red square?" with a blue square: POPE's adversarial kind).
    The rest of the corpus says "no" only to absent shapes, so an LLM that says "yes"
    whenever the asked shape is there, whatever the colour, was always right."""
    s = sw.sample_scene(rng)
    turns = []
    for _ in range(rng.randint(2, 6)):
        w = rng.choice(wd.yes_no_wordings(coloured=rng.random() < DRILL_COLOUR_WORDED))
        positive = rng.random() < 0.5
        negative = "adversarial" if rng.random() < DRILL_ADVERSARIAL else "random"
        q = wd.yes_no(s, rng, w, positive, negative_from=negative)
        turns.append((wd.vary(q.text, rng), q.answer))
    turns[0] = (f"{rng.choice(FRAMES).format(sw.notes(s))} {turns[0][0]}", turns[0][1])
    return chat(turns, rng)


DOC_MIX = ((record_doc, 0.12), (chat_doc, 0.78), (skill_doc, 0.06), (small_talk_doc, 0.04))
DRILL_SHARE = 0.3
# curriculum.WITH_DRILLS: the same documents, with yes / no drills in place of 30 % of them
DRILL_MIX = ((yes_no_doc, DRILL_SHARE),) + tuple((fn, w * (1 - DRILL_SHARE)) for fn, w in DOC_MIX)


def pick(mix, rng: random.Random):
    """The function of a ((function, weight), ...) mix drawn by weight, with one rng.random()."""
    r, acc = rng.random(), 0.0
    for fn, w in mix:
        acc += w
        if r < acc:
            return fn
    return mix[-1][0]


def sample_doc(rng: random.Random, mix=DOC_MIX) -> str:
    doc = pick(mix, rng)(rng)
    if wd.uses_heldout(doc) or any(f in doc for f in FORBIDDEN):  # never, by construction; a guard
        return sample_doc(rng, mix)
    return doc


_ANSWER = re.compile(r"###Assistant: ?(.*?###)", re.S)             # an answer and its end symbol
_CAPTION = re.compile(rf"^(?:\S+ ){{{sw.NOTES_LEN}}}(.*\n)", re.M)     # after a 22-word record


def answer_spans(doc: str) -> list[tuple[int, int]]:
    """Character spans of `doc` that answer: each assistant answer with its `###`, and in
    catalogue lines the caption after the notes. With `--llm-loss answers` the pretraining
    loss is on these alone, as Vicuna/FastChat trains on assistant turns only; the notes
    and human turns are then context, never targets.

    >>> d = "###Human: Scene: x. What is it?###Assistant: A star.###"
    >>> [d[a:b] for a, b in answer_spans(d)]
    ['A star.###']
    """
    if "###" in doc:
        return [m.span(1) for m in _ANSWER.finditer(doc)]
    return [m.span(1) for m in _CAPTION.finditer(doc)]


def documents(n: int, seed: int, mix=DOC_MIX) -> list[str]:
    rng = random.Random(seed)
    return [sample_doc(rng, mix) for _ in range(n)]


class Drilled:
    """The corpus read with `DRILL_MIX` (pretrain_llm.CORPORA["chats+yes/no"]), as a corpus module."""
    sample_doc = staticmethod(lambda rng: sample_doc(rng, DRILL_MIX))
    documents = staticmethod(lambda n, seed: documents(n, seed, DRILL_MIX))
