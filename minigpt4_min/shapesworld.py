"""ShapesWorld: the synthetic, seeded image world of the `tiny` scale (DESIGN.md §3).

Every image is drawn from a `Scene` whose ground truth is known, so every claim of the
MiniGPT-4 paper (arXiv 2304.10592) can be *measured* here: attribute accuracy, object
recall, hallucination (CHAIR), VQA accuracy, failure rates.

A scene holds 1-3 objects, each with a shape, colour, size and one of five positions,
on a background colour. This module also writes every kind of text the tiny scale needs:

* `notes(scene)`     the scene "in words" as a fixed 22-word record, the form in which the
                     miniature LLM reads scenes during its text-only pretraining;
* `caption(scene)`   a short, noisy alt-text caption (stage 1 data, paper §3.1);
* `describe(scene)`  a complete description (what stage 2 should teach, paper §3.2);
* `qa_pairs(scene)`  questions with ground-truth answers (VQA);
* `poem/story/ad`    the "skills" the LLM learns from text alone (paper §4, emergent skills).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = {  # name -> RGB
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
SIZES = ("small", "large")
# Canonical reading order of the five anchor positions; objects are listed in this order.
POSITIONS = ("left", "top", "center", "bottom", "right")
POSITION_XY = {"left": (0.19, 0.5), "top": (0.5, 0.19), "center": (0.5, 0.5),
               "bottom": (0.5, 0.81), "right": (0.81, 0.5)}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "center": "in the center"}
COUNT_WORDS = ("zero", "one", "two", "three")
MAX_OBJECTS = 3
NOTE_SLOT = ("position", "size", "colour", "shape")  # words per place in `notes`
NOTES_LEN = len(POSITIONS) * len(NOTE_SLOT) + 2  # + background + count = 22 words
NONE_WORD = "none"


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:  # "large red circle"
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    seed: int = 0

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background,
                "seed": self.seed}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        try:
            objs = tuple(Obj(**o) for o in d["objects"])
            return Scene(objs, d["background"], int(d.get("seed", 0)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a ShapesWorld scene dict ({e}): {d!r}") from None

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}


# ----------------------------------------------------------------------------- scenes
def sample_scene(rng: random.Random, seed: int = 0) -> Scene:
    n = rng.choice((1, 2, 2, 3, 3))
    positions = sorted(rng.sample(POSITIONS, n), key=POSITIONS.index)
    objs = tuple(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), p)
                 for p in positions)
    return Scene(objs, rng.choice(list(BACKGROUNDS)), seed)


def make_scenes(n: int, seed: int) -> list[Scene]:
    """n scenes; scene i depends only on (seed, i), so any subset is reproducible."""
    return [sample_scene(random.Random(seed * 1_000_003 + i), seed=seed * 1_000_003 + i)
            for i in range(n)]


# ----------------------------------------------------------------------------- images
def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, angles = r * 0.85, [45, 135, 225, 315]
        return [(cx + k * 1.41 * np.cos(np.radians(a + rot)), cy + k * 1.41 * np.sin(np.radians(a + rot)))
                for a in angles]
    if shape == "triangle":
        return [(cx + r * np.cos(np.radians(a + rot)), cy + r * np.sin(np.radians(a + rot)))
                for a in (-90, 30, 150)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.65, cy), (cx, cy + r), (cx - r * 0.65, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = np.radians(-90 + 36 * i + rot)
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_with_shapes(scene: Scene, size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """The image and, pixel for pixel, which shape covers it (0 = background, i + 1 = SHAPES[i])."""
    rng = np.random.default_rng(scene.seed)
    bg = np.array(BACKGROUNDS[scene.background]) + rng.integers(-12, 13, 3)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in np.clip(bg, 0, 255)))
    labels = Image.new("L", (size, size), 0)
    draw, draw_l = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    for o in scene.objects:
        fx, fy = POSITION_XY[o.position]
        cx = fx * size + rng.uniform(-0.04, 0.04) * size
        cy = fy * size + rng.uniform(-0.04, 0.04) * size
        r = (0.085 if o.size == "small" else 0.15) * size * rng.uniform(0.92, 1.08)
        col = np.clip(np.array(COLOURS[o.colour]) + rng.integers(-18, 19, 3), 0, 255)
        fill, k = tuple(int(c) for c in col), SHAPES.index(o.shape) + 1
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            draw_l.ellipse([cx - r, cy - r, cx + r, cy + r], fill=k)
        else:
            rot = rng.uniform(-12, 12) if o.shape in ("triangle", "square") else 0.0
            draw.polygon(_polygon(o.shape, cx, cy, r, rot), fill=fill)
            draw_l.polygon(_polygon(o.shape, cx, cy, r, rot), fill=k)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 5, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), np.asarray(labels)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB image of `size` x `size` px (jitter seeded by scene.seed)."""
    return render_with_shapes(scene, size)[0]


def patch_shapes(shape_map: np.ndarray, patch: int, min_pixels: int = 6) -> np.ndarray:
    """(size/patch)^2 labels from a `render_with_shapes` map: the shape covering most of
    each patch (0 if it covers fewer than `min_pixels`)."""
    m = shape_map
    n = m.shape[0] // patch
    blocks = m.reshape(n, patch, n, patch).transpose(0, 2, 1, 3).reshape(n * n, patch * patch)
    counts = np.stack([(blocks == k).sum(1) for k in range(len(SHAPES) + 1)], 1)   # (P, 6)
    counts[:, 0] = 0
    best = counts.argmax(1)
    return np.where(counts.max(1) >= min_pixels, best, 0)


# ----------------------------------------------------------------------------- text
def notes(scene: Scene) -> str:
    """The scene as a fixed 22-word record: for each of the five places, in reading order,
    the place and what is there (size colour shape, or "none none none"); then the
    background and the number of objects.

    >>> notes(Scene((Obj("circle", "red", "large", "left"),), "gray"))
    'left large red circle top none none none center none none none bottom none none none right none none none gray one'
    """
    at = {o.position: o for o in scene.objects}
    words: list[str] = []
    for p in POSITIONS:
        o = at.get(p)
        words += [p, o.size, o.colour, o.shape] if o else [p, NONE_WORD, NONE_WORD, NONE_WORD]
    words += [scene.background, COUNT_WORDS[len(scene.objects)]]
    return " ".join(words)


def notes_vocab() -> list[str]:
    """Every word that can appear in `notes` (the encoder's pretraining labels)."""
    return sorted(set(SIZES) | set(COLOURS) | set(SHAPES) | set(POSITIONS) | set(BACKGROUNDS)
                  | set(COUNT_WORDS[1:]) | {NONE_WORD})


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def object_sentence(o: Obj, rng: random.Random) -> str:
    where = POSITION_PHRASE[o.position]
    t = rng.randrange(4)
    if t == 0:
        return f"There is a {o.phrase()} {where}."
    if t == 1:
        return f"A {o.phrase()} is {where}."
    if t == 2:
        return f"I can see a {o.phrase()} {where}."
    return f"{_cap(where)} there is a {o.phrase()}."


def describe(scene: Scene, rng: random.Random | None = None) -> str:
    """A complete description: every object with size, colour, shape, place; the background."""
    rng = rng or random.Random(scene.seed)
    n = len(scene.objects)
    opening = rng.choice([f"The image shows {COUNT_WORDS[n]} shape{'s' if n > 1 else ''}.",
                          f"There {'are' if n > 1 else 'is'} {COUNT_WORDS[n]} shape{'s' if n > 1 else ''} in this image.",
                          ""])
    parts = [opening] if opening else []
    parts += [object_sentence(o, rng) for o in scene.objects]
    parts.append(rng.choice([f"The background is {scene.background}.",
                             f"Everything is on a {scene.background} background."]))
    return " ".join(parts)


FILLERS = ("nice picture", "photo", "stock image", "my drawing", "look at this", "wallpaper",
           "free download", "art", "best shapes", "new post")


# the caption templates below that name a position (2 of 9: where a stage-1 model can learn
# "where" from); notebook 06 varies their share
POSITION_TEMPLATES = (3, 7)


def caption(scene: Scene, rng: random.Random, position_share: float | None = None) -> str:
    """A short, noisy stage-1 caption (alt-text style: partial, lower case, some filler).

    It never lists everything: at most two objects, some attributes dropped. One of 9
    templates, drawn uniformly (`position_share=None`, the shipped data: 2 of 9 name a
    position); with `position_share` p, a position template with probability p, one of the
    other 7 otherwise (the caption-content ablation of notebook 06).
    """
    objs = list(scene.objects)
    o = rng.choice(objs)
    if position_share is None:
        t = rng.randrange(9)
    elif rng.random() < position_share:
        t = rng.choice(POSITION_TEMPLATES)
    else:
        t = rng.choice([k for k in range(9) if k not in POSITION_TEMPLATES])
    if t == 0:
        c = f"{o.colour} {o.shape}"
    elif t == 1:
        c = f"a {o.phrase()}"
    elif t == 2:
        c = f"{o.colour} {o.shape} on {scene.background}"
    elif t == 3:
        c = f"a {o.shape} on the {o.position}"
    elif t == 4 and len(objs) > 1:
        a, b = rng.sample(objs, 2)
        c = f"a {a.colour} {a.shape} and a {b.colour} {b.shape}"
    elif t == 5:
        c = f"{o.size} {o.shape} {o.colour}"
    elif t == 6:
        c = f"{COUNT_WORDS[len(objs)]} shape{'s' if len(objs) > 1 else ''} on {scene.background} background"
    elif t == 7:
        c = f"the {o.colour} {o.shape} {POSITION_PHRASE[o.position]}"
    else:
        c = f"{o.colour} {o.shape}"
    if rng.random() < 0.3:
        f = rng.choice(FILLERS)
        c = f"{f} {c}" if rng.random() < 0.5 else f"{c} {f}"
    return c


def qa_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Questions with ground-truth answers about one scene (shuffled, 4-6 of them)."""
    out: list[tuple[str, str]] = []
    n = len(scene.objects)
    counts = {s: sum(o.shape == s for o in scene.objects) for s in SHAPES}
    for o in scene.objects:
        if counts[o.shape] == 1:
            out.append((f"What color is the {o.shape}?", f"The {o.shape} is {o.colour}."))
            out.append((f"What size is the {o.shape}?", f"The {o.shape} is {o.size}."))
        out.append((f"Where is the {o.colour} {o.shape}?", f"The {o.colour} {o.shape} is {POSITION_PHRASE[o.position]}."))
    out.append(("How many shapes are there?",
                f"There {'are' if n > 1 else 'is'} {COUNT_WORDS[n]} shape{'s' if n > 1 else ''}."))
    out.append(("What color is the background?", f"The background is {scene.background}."))
    absent = [s for s in SHAPES if counts[s] == 0]
    if absent:
        s = rng.choice(absent)
        out.append((f"Is there a {s}?", f"No, there is no {s}."))
    o = rng.choice(scene.objects)
    out.append((f"Is there a {o.shape}?", f"Yes, there is a {o.colour} {o.shape}."))
    pos_obj = rng.choice(scene.objects)
    out.append((f"What is {POSITION_PHRASE[pos_obj.position]}?",
                f"There is a {pos_obj.phrase()} {POSITION_PHRASE[pos_obj.position]}."))
    rng.shuffle(out)
    return out[: rng.randint(4, 6)]


# Emergent "skills" (paper §4): the LLM learns these from text alone.
def poem(objs: list[Obj], background: str | None, rng: random.Random) -> str:
    o = objs[0]
    lines = [rng.choice([f"A {o.colour} {o.shape}, {o.size} and bright,",
                         f"Oh {o.colour} {o.shape}, so {o.size} and proud,",
                         f"I saw a {o.colour} {o.shape} today,"])]
    if len(objs) > 1:
        p = objs[1]
        lines.append(rng.choice([f"beside it sits a {p.colour} {p.shape},",
                                 f"and near it waits a {p.colour} {p.shape},"]))
    else:
        lines.append(rng.choice(["it sits alone in quiet grace,", "it needs no friend to keep it bright,"]))
    if background:
        lines.append(rng.choice([f"upon a field of {background} it stays,",
                                 f"the {background} world around it glows,"]))
    lines.append(rng.choice(["and shapes will dance in every light.", "a little song of form and hue."]))
    return "\n".join(lines)


def story(objs: list[Obj], background: str | None, rng: random.Random) -> str:
    o = objs[0]
    s = [f"Once upon a time there was a {o.size} {o.colour} {o.shape}."]
    if len(objs) > 1:
        p = objs[1]
        s.append(rng.choice([f"Its best friend was a {p.colour} {p.shape}.",
                             f"One day it met a {p.colour} {p.shape}."]))
        s.append("They played together all day long.")
    else:
        s.append(rng.choice(["It wanted to find a friend.", "It liked to roll around and sing."]))
    if background:
        s.append(f"Their world was {background} and calm.")
    s.append(rng.choice(["The end.", "And they were happy forever."]))
    return " ".join(s)


def ad(objs: list[Obj], background: str | None, rng: random.Random) -> str:
    o = objs[0]
    s = [rng.choice([f"Buy the new {o.colour} {o.shape} today!",
                     f"Introducing the {o.size} {o.colour} {o.shape}!"])]
    if len(objs) > 1:
        p = objs[1]
        s.append(f"Now with a free {p.colour} {p.shape}.")
    s.append(rng.choice(["The best shape you will ever own.", "Only while stocks last!",
                         "Your home deserves it."]))
    return " ".join(s)


SKILLS = {"poem": poem, "story": story, "ad": ad}
SKILL_REQUESTS = {
    "poem": ["Write a poem about it.", "Write a short poem about this.", "Can you write a poem?"],
    "story": ["Tell me a story about it.", "Write a short story about this."],
    "ad": ["Write an ad for it.", "Write an advertisement for this."],
}


SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3, "encoder": 4, "stage2": 5}


def split(name: str, n: int) -> list[Scene]:
    """Scenes of a named split; the seeds keep train / val / test disjoint."""
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; expected one of {list(SPLIT_SEEDS)}")
    return make_scenes(n, SPLIT_SEEDS[name])


def scene_at(name: str, index: int) -> Scene:
    """Scene `index` of split `name` (the same as `split(name, n)[index]`, without the others)."""
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; expected one of {list(SPLIT_SEEDS)}")
    seed = SPLIT_SEEDS[name] * 1_000_003 + index
    return sample_scene(random.Random(seed), seed=seed)


def test_image(index: int, size: int = 64) -> Image.Image:
    """Held-out test image `index` (e.g. the chat widget's "ShapesWorld sample")."""
    return render(scene_at("test", index), size)
