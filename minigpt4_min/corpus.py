"""The miniature LLM's text-only pretraining corpus: a "Vicuna" of ShapesWorld.

MiniGPT-4 (arXiv 2304.10592 §3) freezes an LLM that learned language from text alone;
its emergent skills (poems, ads, stories about an image, §4) come from that text. Our
miniature LLM likewise never sees an image. It reads scenes *in words* — the 14-word
`shapesworld.notes` record — and learns to copy them into descriptions and answers, to
write captions after them, and to write poems, stories and ads, in the Vicuna v0 chat
format `###Human: ... ###Assistant: ...###`.

Design note (DESIGN.md §5): a templated corpus makes colour / shape words interchangeable
and their embeddings collapse; the fix is frozen random input embeddings plus a
copy-heavy, multi-turn corpus. Copying is what a linear projection later exploits.
"""
from __future__ import annotations

import random
import re

from . import shapesworld as sw

SYSTEMS = ("A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.",
           "Give helpful answers about shapes.")
INTROS = ("Scene: ", "Notes: ", "Here is a scene: ", "", "Look at this: ")
DESCRIBE = ("Describe the scene.", "Describe it in detail.", "What do you see?",
            "Describe everything you see.", "Tell me what is in the scene.",
            "Describe this.", "What is in it?")


def chat(turns: list[tuple[str, str]], rng: random.Random) -> str:
    """Render (human, assistant) turns in one of the two Vicuna v0 spacings.

    Stage-2 training uses `###Human: {} ###Assistant: ` (spaces), the demo chat has none;
    the corpus holds both so the frozen LLM accepts either.
    """
    spaced = rng.random() < 0.5
    out = rng.choice(SYSTEMS) if rng.random() < 0.25 else ""
    for h, a in turns:
        out += f"###Human: {h} ###Assistant: {a}###" if spaced else f"###Human: {h}###Assistant: {a}###"
    return out


def record_doc(rng: random.Random) -> str:
    """Catalogue lines: a scene's notes followed by a short caption (no chat)."""
    lines = []
    for _ in range(rng.randint(2, 4)):
        s = sw.sample_scene(rng)
        lines.append(f"{sw.notes(s)} {sw.caption(s, rng)}\n")
    return "".join(lines)


def describe_doc(rng: random.Random) -> str:
    s = sw.sample_scene(rng)
    turns = [(f"{rng.choice(INTROS)}{sw.notes(s)}. {rng.choice(DESCRIBE)}", sw.describe(s, rng))]
    if rng.random() < 0.5:
        turns += sw.qa_pairs(s, rng)[: rng.randint(1, 3)]
    return chat(turns, rng)


def qa_doc(rng: random.Random) -> str:
    s = sw.sample_scene(rng)
    qa = sw.qa_pairs(s, rng)
    first_q, first_a = qa[0]
    turns = [(f"{rng.choice(INTROS)}{sw.notes(s)}. {first_q}", first_a)] + qa[1:]
    return chat(turns, rng)


def skill_doc(rng: random.Random) -> str:
    """A poem / story / ad about a scene given as notes, or about objects named in words."""
    s = sw.sample_scene(rng)
    skill = rng.choice(list(sw.SKILLS))
    objs = list(s.objects)
    rng.shuffle(objs)
    if rng.random() < 0.6:
        h = f"{rng.choice(INTROS)}{sw.notes(s)}. {rng.choice(sw.SKILL_REQUESTS[skill])}"
        return chat([(h, sw.SKILLS[skill](objs, s.background, rng))], rng)
    o = objs[0]
    what = {"poem": "Write a poem about", "story": "Tell me a story about",
            "ad": "Write an ad for"}[skill]
    return chat([(f"{what} a {o.size} {o.colour} {o.shape}.", sw.SKILLS[skill]([o], None, rng))], rng)


DOC_MIX = ((record_doc, 0.15), (describe_doc, 0.35), (qa_doc, 0.30), (skill_doc, 0.20))


def sample_doc(rng: random.Random) -> str:
    r, acc = rng.random(), 0.0
    for fn, w in DOC_MIX:
        acc += w
        if r < acc:
            return fn(rng)
    return DOC_MIX[-1][0](rng)


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


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sample_doc(rng) for _ in range(n)]
