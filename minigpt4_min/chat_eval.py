"""Measuring the chat (paper §4: the demo; DESIGN.md §3: held-out wordings, POPE).

MiniGPT-4's claim is that the frozen LLM's language ability carries over to images. At
the tiny scale we can measure it, with the demo's own prompt (`conversation.Chat`, the
`vicuna0` template and its system message):

* `wording_accuracy`  one question per fresh chat, in the corpus's or in HELD-OUT
                      wordings (`wordings.HELDOUT`, never in the LLM's corpus), per kind;
* `turn_check`        the same question at turn 1 (fresh chat) and at turn 5 (after four
                      other turns about the same image), also graded on another image;
* `pope`              balanced yes / no "Is there a ...?" questions, negatives drawn at
                      random (an absent shape) and adversarially (a present shape in another
                      colour), Li et al. 2023;
* `sampled_hygiene`   sampled answers (temperature 1.0, top-p 0.9) that leak the notes
                      record or a stage-1 caption filler.
"""
from __future__ import annotations

import random
import warnings

import torch
from tqdm.auto import tqdm

from . import shapesworld as sw
from . import wordings as wd
from .conversation import IMAGE_MESSAGE, Chat, embed_prompt, get_template
from .evaluate import accuracy_by_kind, asked_correct, has_filler, has_raw_notes, pope_by_setting
from .model import GenerationSettings

TURN_KINDS = ("count", "background", "what_where")   # their wording does not depend on the image


def fresh_chat_prompt(question: str, template: str = "vicuna0") -> str:
    """The demo's text for a new chat: an image, then one question."""
    conv = get_template(template)
    conv.append_message(conv.roles[0], f"{IMAGE_MESSAGE} {question}")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@torch.no_grad()
def ask_fresh(model, fs, idx: list[int], questions: list[str], settings: GenerationSettings | None = None,
              batch_size: int = 100, desc: str = "chat") -> list[str]:
    """Answer `questions[j]` about image `idx[j]` of the FeatureSet `fs`, each in a fresh chat."""
    s = settings or GenerationSettings(max_new_tokens=24)
    out: list[str] = []
    for j in tqdm(range(0, len(idx), batch_size), desc=desc, leave=False):
        prompts = [fresh_chat_prompt(q) for q in questions[j:j + batch_size]]
        out += model.generate(prompts, feats=fs.feats[idx[j:j + batch_size]], settings=s)
    return out


def wording_accuracy(model, fs, split: str, seed: int = 0) -> tuple[dict[str, float], list[tuple]]:
    """Accuracy per kind of one question per fresh chat, in `split`'s wordings."""
    rng = random.Random(seed)
    asked = [(i, q) for i, s in enumerate(fs.scenes) for q in wd.questions(s, rng, split)]
    answers = ask_fresh(model, fs, [i for i, _ in asked], [q.text for _, q in asked], desc=f"{split} wordings")
    rows = [(i, q, a) for (i, q), a in zip(asked, answers)]
    return accuracy_by_kind(answers, [q for _, q in asked]), rows


def turn_check(model, scenes: list[sw.Scene], others: list[sw.Scene], seed: int = 0,
               max_new_tokens: int = 24, default_new_tokens: int | None = None) -> dict:
    """The same question at turn 1 and at turn 5 of a chat about the same image.

    Turns 1-4 of the long chat: a detailed description and three questions of other kinds.
    The target question is graded on its own image and, as a control, on `others[i]` (the
    same text's truth for another image). Also counts chats whose prompt would be cut at
    the chat's default `max_new_tokens` (`default_new_tokens`)."""
    first, fifth, fifth_other, longest, cut = [], [], [], 0, 0
    for i, (scene, other) in enumerate(tqdm(list(zip(scenes, others)), desc="turns", leave=False)):
        kind = TURN_KINDS[i % len(TURN_KINDS)]
        q = wd.ask(scene, kind, random.Random(seed * 7919 + i))
        q_other = wd.ask(other, kind, random.Random(seed * 7919 + i))
        assert q.text == q_other.text
        img = sw.render(scene, model.cfg.image_size)
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        one = Chat(model, settings=settings)
        one.upload_img(img)
        one.ask(q.text)
        first.append(asked_correct(one.answer(), q))
        long = Chat(model, settings=settings)
        long.upload_img(img)
        rng = random.Random(seed * 104729 + i)
        fillers = ["Describe this image in detail."] + [
            f.text for f in (wd.ask(scene, k, rng) for k in ("colour", "size", "yesno", "position", "background")) if f][:3]
        for text in fillers:
            long.ask(text)
            long.answer(GenerationSettings(max_new_tokens=80 if text.startswith("Describe") else max_new_tokens))
        long.ask(q.text)
        a = long.answer()
        fifth.append(asked_correct(a, q))
        fifth_other.append(asked_correct(a, q_other))
        n = len(embed_prompt(model, long.conv.get_prompt(), long.images)[0])
        longest = max(longest, n)
        cut += n + (default_new_tokens or max_new_tokens) > long.max_length
    k = max(len(first), 1)
    return {"turn1": sum(first) / k, "turn5": sum(fifth) / k, "turn5_other_image": sum(fifth_other) / k,
            "longest_5turn_positions": longest, "cut_at_default": cut, "n": len(first)}


def pope(model, fs, seed: int = 0) -> tuple[dict[str, float], list[tuple]]:
    """POPE-style probe: per image, one yes and one no question in each setting."""
    asked = wd.pope_questions(fs.scenes, seed)
    answers = ask_fresh(model, fs, [i for i, _, _ in asked], [q.text for _, _, q in asked], desc="POPE")
    return pope_by_setting(asked, answers), [(i, st, q.text, q.value, a) for (i, st, q), a in zip(asked, answers)]


def sampled_hygiene(model, fs, n: int = 500, seed: int = 0, max_new_tokens: int = 60) -> tuple[dict, list[str]]:
    """Share of `n` sampled answers (T 1.0, top-p 0.9; questions of every kind in both
    wordings, descriptions, poems) that leak the notes record or a caption filler."""
    from .corpus import DESCRIBE
    rng = random.Random(seed)
    idx, texts = [], []
    while len(idx) < n:
        i = rng.randrange(len(fs))
        r = rng.random()
        if r < 0.2:
            text = rng.choice(DESCRIBE)
        elif r < 0.3:
            text = rng.choice([x for xs in sw.SKILL_REQUESTS.values() for x in xs])
        else:
            q = wd.ask(fs.scenes[i], rng.choice(wd.KINDS), rng, rng.choice(("corpus", "heldout")))
            if q is None:
                continue
            text = q.text
        idx.append(i)
        texts.append(text)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=0.9)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        answers = ask_fresh(model, fs, idx, texts, settings=settings, desc="sampled")
    notes = [has_raw_notes(a) for a in answers]
    filler = [has_filler(a) for a in answers]
    clean = sum(not (x or y) for x, y in zip(notes, filler)) / max(len(answers), 1)
    return ({"clean_share": clean, "raw_notes": sum(notes), "fillers": sum(filler), "n": len(answers)},
            [f"{t} -> {a}" for t, a in zip(texts, answers)])
