"""The FIRST corpus of the miniature LLM: phases 1-2 of its curriculum (`curriculum.py`).

MiniGPT-4 (arXiv 2304.10592 §3) freezes an LLM pretrained on text alone; ours is made in
phases, and this is the text of the first two. It is the corpus the project's first
miniature LLM learnt from (commit 467dec4), kept document for document: the same
documents for the same seed. Scenes in words (the 22-word `shapesworld.notes` record)
with ONE wording per question kind (`shapesworld.qa_pairs`), a third of the documents full
descriptions right after the notes, catalogue lines (`notes caption`), poems, stories and
ads, in the Vicuna v0 chat format `###Human: ... ###Assistant: ...###`.

Why keep a narrow corpus: on it, within 6,400 steps, both runs so far grew a head that
copies each colour into its shape's position (`heads.binding_heads`: the first LLM 0.95 in
layer 2 of 4, a run from scratch 0.98 in layer 1), which no LLM trained on the
many-wordings corpus alone had (binding 0.51). The first LLM also learnt there to read it
("What color is the X?" answered with X's own colour 0.92), the rerun only in the third
phase, which teaches the many wordings of `corpus.py` on top (curriculum.py has the numbers).

Like `corpus.py`, it never contains `<Img>`, `<ImageHere>`, `ImageContent` or the demo's
system prompt (a test checks it).
"""
from __future__ import annotations

import random

from . import shapesworld as sw
from .corpus import pick, record_doc     # catalogue lines (notes + caption), the same in both

SYSTEMS = ("A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
           "Give helpful answers about shapes.")
INTROS = ("Scene: ", "Notes: ", "Here is a scene: ", "", "Look at this: ")
DESCRIBE = ("Describe the scene.", "Describe it in detail.", "What do you see?",
            "Describe everything you see.", "Tell me what is in the scene.",
            "Describe this.", "What is in it?")
SKILL_VERBS = {"poem": "Write a poem about", "story": "Tell me a story about", "ad": "Write an ad for"}


def chat(turns: list[tuple[str, str]], rng: random.Random) -> str:
    """(human, assistant) turns in one of the two Vicuna v0 spacings (stage 2's
    `###Human: {} ###Assistant: ` and the demo's, without spaces), a system line in a quarter."""
    spaced = rng.random() < 0.5
    out = rng.choice(SYSTEMS) if rng.random() < 0.25 else ""
    for h, a in turns:
        out += f"###Human: {h} ###Assistant: {a}###" if spaced else f"###Human: {h}###Assistant: {a}###"
    return out


def describe_doc(rng: random.Random) -> str:
    """The notes and a request to describe them, a full description; in half, 1-3 questions."""
    s = sw.sample_scene(rng)
    turns = [(f"{rng.choice(INTROS)}{sw.notes(s)}. {rng.choice(DESCRIBE)}", sw.describe(s, rng))]
    if rng.random() < 0.5:
        turns += sw.qa_pairs(s, rng)[: rng.randint(1, 3)]
    return chat(turns, rng)


def qa_doc(rng: random.Random) -> str:
    """The notes with the first of `qa_pairs`' questions, then the others, one per turn."""
    s = sw.sample_scene(rng)
    qa = sw.qa_pairs(s, rng)
    first_q, first_a = qa[0]
    return chat([(f"{rng.choice(INTROS)}{sw.notes(s)}. {first_q}", first_a)] + qa[1:], rng)


def skill_doc(rng: random.Random) -> str:
    """A poem / story / ad about a scene given as notes (60 %), or about one object in words."""
    s = sw.sample_scene(rng)
    skill = rng.choice(list(sw.SKILLS))
    objs = list(s.objects)
    rng.shuffle(objs)
    if rng.random() < 0.6:
        h = f"{rng.choice(INTROS)}{sw.notes(s)}. {rng.choice(sw.SKILL_REQUESTS[skill])}"
        return chat([(h, sw.SKILLS[skill](objs, s.background, rng))], rng)
    o = objs[0]
    return chat([(f"{SKILL_VERBS[skill]} a {o.size} {o.colour} {o.shape}.",
                  sw.SKILLS[skill]([o], None, rng))], rng)


DOC_MIX = ((record_doc, 0.15), (describe_doc, 0.35), (qa_doc, 0.30), (skill_doc, 0.20))


def sample_doc(rng: random.Random) -> str:
    return pick(DOC_MIX, rng)(rng)


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sample_doc(rng) for _ in range(n)]
