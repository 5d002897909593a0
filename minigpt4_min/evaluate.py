"""Measuring generated text against ShapesWorld ground truth (paper §4-5 metrics).

All metrics read plain text the way a grader would: find the object mentions (a shape
word with the size / colour words right before it and a position phrase in its sentence)
and compare them with the scene.

* attribute accuracy  over mentions of objects that ARE in the image: stated attribute
                      values (size, colour, position) that match the best-matching
                      object of that shape / all stated attribute values;
* hallucination-free  a text is hallucination-free if every shape it mentions is present;
* CHAIR_i             mentioned objects absent from the image / all mentioned objects,
  CHAIR_s             texts with at least one absent object / all texts (Rohrbach et al.);
* object recall       objects of the image that are mentioned / objects in the image;
* exact scene         the mentions are exactly the scene's objects with all four
                      attributes right, nothing more, and the background is right;
* failure modes       empty, too short, repeated phrases, broken (unfinished) last sentence,
                      off-format (talks as Human / Assistant, emits template or image tags);
* VQA accuracy        answers to generated questions (colour of X, where is X, how many
                      shapes) that state the right value and no other value of that kind;
* names a real object a text (e.g. a poem) mentions an object of the image with its colour.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from . import shapesworld as sw

_WORD = re.compile(r"[a-z]+")
_PHRASE_TO_POS = {v: k for k, v in sw.POSITION_PHRASE.items()}


@dataclass(frozen=True)
class Mention:
    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"[.!?\n]+", text) if s.strip()]


def parse_mentions(text: str) -> list[Mention]:
    """Object mentions in `text`: "a large red circle on the left" -> Mention(circle, red, large, left).

    Plural shape words ("shapes", "circles") are not object mentions. A position phrase
    is attached only when its sentence mentions exactly one object.
    """
    out: list[Mention] = []
    for sent in sentences(text.lower()):
        words = _WORD.findall(sent)
        found = []
        for i, w in enumerate(words):
            if w in sw.SHAPES:
                colour = size = None
                for j in (i - 1, i - 2):
                    if j >= 0 and words[j] in sw.COLOURS and colour is None:
                        colour = words[j]
                    elif j >= 0 and words[j] in sw.SIZES and size is None:
                        size = words[j]
                    else:
                        break
                # "small star yellow": a colour right after the shape, caption style
                if colour is None and i + 1 < len(words) and words[i + 1] in sw.COLOURS:
                    colour = words[i + 1]
                found.append([w, colour, size])
        pos = None
        joined = " ".join(words)
        hits = [p for phrase, p in _PHRASE_TO_POS.items() if phrase in joined]
        hits += [p for p in sw.POSITIONS if re.search(rf"\bthe {p}\b", joined) and p not in hits]
        if len(found) == 1 and len(hits) == 1:
            pos = hits[0]
        out += [Mention(s, c, z, pos) for s, c, z in found]
    return out


def _match_score(m: Mention, o: sw.Obj) -> tuple[int, int]:
    stated = [(m.colour, o.colour), (m.size, o.size), (m.position, o.position)]
    stated = [(a, b) for a, b in stated if a is not None]
    return sum(a == b for a, b in stated), len(stated)


def attribute_counts(mentions: list[Mention], scene: sw.Scene) -> tuple[int, int]:
    """(correct, stated) attribute values over mentions whose shape is in the scene."""
    correct = stated = 0
    for m in mentions:
        cands = [o for o in scene.objects if o.shape == m.shape]
        if cands:
            c, n = max((_match_score(m, o) for o in cands), key=lambda t: t[0])
            correct, stated = correct + c, stated + n
    return correct, stated


def hallucinated(mentions: list[Mention], scene: sw.Scene) -> list[Mention]:
    return [m for m in mentions if m.shape not in scene.shapes]


def background_of(text: str) -> str | None:
    m = re.search(r"\b(" + "|".join(sw.BACKGROUNDS) + r")\b background|background is (\w+)", text.lower())
    if not m:
        return None
    return m.group(1) or m.group(2)


def exact_scene(text: str, scene: sw.Scene) -> bool:
    """True iff the text names exactly the scene's objects, all attributes right, and its background."""
    got = Counter(parse_mentions(text))
    want = Counter(Mention(o.shape, o.colour, o.size, o.position) for o in scene.objects)
    return got == want and background_of(text) == scene.background


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the same text."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def repeated_sentence_rate(text: str) -> float:
    """Fraction of sentences that repeat an earlier sentence of the same text (case-insensitive)."""
    sents = [" ".join(_WORD.findall(s.lower())) for s in sentences(text)]
    return 1.0 - len(set(sents)) / len(sents) if sents else 0.0


def repetition(texts: list[str]) -> dict[str, float]:
    """Mean repeated 3-gram rate and mean repeated-sentence rate over texts."""
    k = max(len(texts), 1)
    return {"repeated_ngram_rate": sum(repeated_ngram_rate(t) for t in texts) / k,
            "repeated_sentence_rate": sum(repeated_sentence_rate(t) for t in texts) / k}


def is_broken(text: str) -> bool:
    """An unfinished last sentence: the text does not end with . ! or ?"""
    t = text.strip()
    return bool(t) and t[-1] not in ".!?"


_OFF_FORMAT = re.compile(r"\b(human|assistant)\s*:|</?img>|<imagehere>|###|\[/?inst\]", re.I)


def is_off_format(text: str) -> bool:
    """The answer leaves its role: speaks as Human / Assistant or emits the template's tags."""
    return bool(_OFF_FORMAT.search(text))


def failure_modes(text: str, min_words: int = 12, max_repeat: float = 0.2) -> dict[str, bool]:
    """Failure modes of a generated answer that stage 2 must fix (paper §3.2, §4.3).

    empty: no words; too_short: fewer than `min_words` words (a *detailed* description
    needs a dozen); repetitive: more than `max_repeat` of its word 3-grams repeat an
    earlier one; broken: the last sentence is cut off (no final . ! ?); off_format: see
    `is_off_format`. `any` is the failure used for the failure rate.
    """
    n_words = len(_WORD.findall(text.lower()))
    modes = {"empty": n_words == 0, "too_short": 0 < n_words < min_words,
             "repetitive": repeated_ngram_rate(text) > max_repeat, "broken": is_broken(text),
             "off_format": is_off_format(text)}
    modes["any"] = any(modes.values())
    return modes


def failure_rates(texts: list[str], **kw) -> dict[str, float]:
    """Share of texts showing each failure mode (and `any`), see `failure_modes`."""
    modes = [failure_modes(t, **kw) for t in texts]
    return {k: sum(m[k] for m in modes) / max(len(modes), 1) for k in modes[0]} if modes else {}


def caption_metrics(texts: list[str], scenes: list[sw.Scene]) -> dict[str, float]:
    """Attribute accuracy, hallucination-free rate, CHAIR_i/CHAIR_s and recall over texts."""
    if len(texts) != len(scenes):
        raise ValueError(f"{len(texts)} texts but {len(scenes)} scenes")
    correct = stated = n_ment = n_hall = hall_texts = recalled = n_obj = 0
    for t, s in zip(texts, scenes):
        ms = parse_mentions(t)
        c, n = attribute_counts(ms, s)
        correct, stated = correct + c, stated + n
        h = hallucinated(ms, s)
        n_ment, n_hall, hall_texts = n_ment + len(ms), n_hall + len(h), hall_texts + bool(h)
        names = {m.shape for m in ms}
        recalled += sum(o.shape in names for o in s.objects)
        n_obj += len(s.objects)
    k = max(len(texts), 1)
    return {"attribute_accuracy": correct / max(stated, 1),
            "hallucination_free": 1 - hall_texts / k,
            "chair_i": n_hall / max(n_ment, 1), "chair_s": hall_texts / k,
            "object_recall": recalled / max(n_obj, 1),
            "mentions_per_text": n_ment / k,
            "mean_words": sum(len(_WORD.findall(t.lower())) for t in texts) / k}


# ------------------------------------------------------------------ VQA on generated questions
@dataclass(frozen=True)
class Question:
    text: str
    kind: str       # "colour" | "position" | "count"
    answer: str     # the ground-truth value: a colour name, a position name or a count word


def vqa_questions(scene: sw.Scene) -> list[Question]:
    """Questions with one right answer: the colour of each shape that occurs once, where each
    object is (by colour and shape), and how many shapes there are."""
    counts = Counter(o.shape for o in scene.objects)
    qs = [Question(f"What color is the {o.shape}?", "colour", o.colour)
          for o in scene.objects if counts[o.shape] == 1]
    qs += [Question(f"Where is the {o.colour} {o.shape}?", "position", o.position)
           for o in scene.objects if sum(p.shape == o.shape and p.colour == o.colour for p in scene.objects) == 1]
    n = len(scene.objects)
    qs.append(Question("How many shapes are there?", "count", sw.COUNT_WORDS[n]))
    return qs


def _values(text: str, kind: str) -> set[str]:
    t = text.lower()
    words = set(_WORD.findall(t))
    if kind == "colour":
        return words & set(sw.COLOURS)
    if kind == "count":
        digits = {str(i): w for i, w in enumerate(sw.COUNT_WORDS)}
        return (words & set(sw.COUNT_WORDS[1:])) | {digits[d] for d in re.findall(r"\b\d\b", t) if d in digits}
    hits = {p for phrase, p in _PHRASE_TO_POS.items() if phrase in t}
    return hits | {p for p in sw.POSITIONS if re.search(rf"\bthe {p}\b", t)}


def vqa_correct(answer: str, q: Question) -> bool:
    """Right iff the answer states the true value and no other value of the asked kind."""
    return _values(answer, q.kind) == {q.answer}


def vqa_accuracy(answers: list[str], questions: list[Question]) -> dict[str, float]:
    """Overall and per-kind accuracy of `answers[i]` to `questions[i]`."""
    if len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers but {len(questions)} questions")
    out, per = {}, {}
    for a, q in zip(answers, questions):
        per.setdefault(q.kind, []).append(vqa_correct(a, q))
    allv = [v for vs in per.values() for v in vs]
    out["vqa_accuracy"] = sum(allv) / max(len(allv), 1)
    out.update({f"vqa_{k}": sum(v) / len(v) for k, v in per.items()})
    return out


# ------------------------------------------------------------------ emergent skills (paper §4)
def names_real_object(text: str, scene: sw.Scene) -> bool:
    """The text mentions an object of the scene with its colour ("a red circle" for a red circle)."""
    return any(m.colour is not None and any(o.shape == m.shape and o.colour == m.colour for o in scene.objects)
               for m in parse_mentions(text))


# ------------------------------------------------------------------ one call: a model on a prompt set
def evaluate_model(model, fs, prompts: dict[str, str], template: str = "###Human: {} ###Assistant: ",
                   n_vqa: int = 60, max_new_tokens: int = 100, min_words: dict[str, int] | None = None,
                   batch_size: int = 100) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Greedy answers of `model` for every image of `fs` (a `stage1.FeatureSet` with scenes) to
    each prompt of `prompts` (name -> instruction with `<ImageHere>`), plus VQA on the first
    `n_vqa` images. Returns (metrics "name/metric", answers per name).

    Per prompt: failure rate and its modes, repetition, CHAIR_i / CHAIR_s, object recall,
    attribute accuracy, mean words. `min_words` sets the too-short threshold per prompt
    (default 12; give short captions and poems their own).
    """
    from .model import GenerationSettings
    from .stage1 import generate_over

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    scenes, metrics, answers = fs.scenes, {}, {}
    for name, instr in prompts.items():
        out = generate_over(model, fs, template.format(instr), settings, batch_size=batch_size, desc=name)
        answers[name] = out
        fr = failure_rates(out, min_words=(min_words or {}).get(name, 12))
        metrics.update({f"{name}/failure_rate": fr["any"], **{f"{name}/{k}": v for k, v in fr.items() if k != "any"}})
        metrics.update({f"{name}/{k}": v for k, v in repetition(out).items()})
        metrics.update({f"{name}/{k}": v for k, v in caption_metrics(out, scenes).items()})
    if n_vqa:
        qs = [(i, q) for i in range(min(n_vqa, len(fs))) for q in vqa_questions(scenes[i])]
        prompts_q = [template.format("<Img><ImageHere></Img> " + q.text) for _, q in qs]
        out = []
        for j in range(0, len(qs), batch_size):
            idx = [i for i, _ in qs[j:j + batch_size]]
            out += model.generate(prompts_q[j:j + batch_size], feats=fs.feats[idx],
                                  settings=GenerationSettings(max_new_tokens=24))
        answers["vqa"] = [f"{q.text} -> {a}" for (_, q), a in zip(qs, out)]
        metrics.update(vqa_accuracy(out, [q for _, q in qs]))
    return metrics, answers


# ------------------------------------------------------------------ questions in a learner's words
_NEGATION = re.compile(r"\b(no|not|nothing|isn't|aren't)\b")


def asked_correct(answer: str, q) -> bool:
    """Grade an answer to a `wordings.Asked` question by its kind: the value kinds as
    `vqa_correct` (the true value and no other of that kind); yes / no by the first word;
    an absent object by a plain negation that states no colour, size or place; what is at
    a place by the shapes named (or 'nothing')."""
    t = answer.lower()
    words = _WORD.findall(t)
    if q.kind in ("colour", "position", "count"):
        return _values(answer, q.kind) == {q.value}
    if q.kind == "size":
        return set(words) & set(sw.SIZES) == {q.value}
    if q.kind == "background":
        return set(words) & set(sw.BACKGROUNDS) == {q.value}
    if q.kind == "yesno":
        return bool(words) and words[0] == q.value
    if q.kind == "absent":
        stated = set(words) & (set(sw.COLOURS) | set(sw.SIZES)) or _values(answer, "position")
        return bool(_NEGATION.search(t)) and q.shape in words and not stated
    if q.kind == "what_where":
        shapes = set(words) & set(sw.SHAPES)
        if q.value == "nothing":
            return not shapes and bool(_NEGATION.search(t))
        return shapes == {q.value}
    raise ValueError(f"unknown question kind {q.kind!r}")


def accuracy_by_kind(answers: list[str], asked: list) -> dict[str, float]:
    """Overall and per-kind accuracy of `answers[i]` to the `wordings.Asked` `asked[i]`."""
    if len(answers) != len(asked):
        raise ValueError(f"{len(answers)} answers but {len(asked)} questions")
    per: dict[str, list[bool]] = {}
    for a, q in zip(answers, asked):
        per.setdefault(q.kind, []).append(asked_correct(a, q))
    allv = [v for vs in per.values() for v in vs]
    return {"all": sum(allv) / max(len(allv), 1), **{k: sum(v) / len(v) for k, v in sorted(per.items())}}


_NOTES_RUN = re.compile(r"\bnone none\b|\b(?:%s) (?:%s) (?:%s) (?:%s)\b" % (
    "|".join(sw.POSITIONS), "|".join(sw.SIZES), "|".join(sw.COLOURS), "|".join(sw.SHAPES)))
_FILLER = re.compile(r"\b(?:%s)\b" % "|".join(re.escape(f) for f in sw.FILLERS if f != "photo" and f != "art"))


def has_raw_notes(text: str) -> bool:
    """The answer leaks the notes record ("none none", or "left large red circle")."""
    return bool(_NOTES_RUN.search(text.lower()))


def has_filler(text: str) -> bool:
    """The answer carries a stage-1 caption filler ("free download", "stock image", ...).
    'photo' and 'art' are left out: a chat answer may say them in plain English."""
    return bool(_FILLER.search(text.lower()))


def pope_scores(answers: list[str], truth: list[str]) -> dict[str, float]:
    """POPE (Li et al., 2023): accuracy, precision, recall, F1 and the share of 'yes' of
    yes / no answers (read from the first word; anything else counts as neither)."""
    said = [(_WORD.findall(a.lower()) or [""])[0] for a in answers]
    tp = sum(s == "yes" and t == "yes" for s, t in zip(said, truth))
    fp = sum(s == "yes" and t == "no" for s, t in zip(said, truth))
    fn = sum(s != "yes" and t == "yes" for s, t in zip(said, truth))
    n = max(len(truth), 1)
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"accuracy": sum(s == t for s, t in zip(said, truth)) / n, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / max(prec + rec, 1e-9), "yes_share": sum(s == "yes" for s in said) / n}


def pope_by_setting(asked: list[tuple], answers: list[str]) -> dict[str, float]:
    """`pope_scores` per setting of `wordings.pope_questions` (its (index, setting, question)
    rows: 'random', 'adversarial') and over all of them ('all'), as {"adversarial/accuracy": ...}."""
    out = {}
    for setting in [*dict.fromkeys(st for _, st, _ in asked), "all"]:
        pick = [(q, a) for (_, st, q), a in zip(asked, answers) if setting in ("all", st)]
        out.update({f"{setting}/{k}": v for k, v in pope_scores([a for _, a in pick], [q.value for q, _ in pick]).items()})
    return out
