"""ShapesWorld: seeded scenes, faithful text, and a corpus that never shows an image."""
import random

import numpy as np
import pytest

from minigpt4_min import corpus
from minigpt4_min import shapesworld as sw
from minigpt4_min.evaluate import exact_scene, parse_mentions


def test_scenes_are_seeded_and_splits_disjoint():
    a, b = sw.split("train", 50), sw.split("train", 50)
    assert a == b
    assert np.array_equal(np.asarray(sw.render(a[3])), np.asarray(sw.render(b[3])))
    test = sw.split("test", 50)
    assert {s.seed for s in a}.isdisjoint({s.seed for s in test})
    assert sw.split("train", 10) == a[:10], "scene i must not depend on how many are drawn"


def test_scene_invariants():
    for s in sw.split("train", 500):
        assert 1 <= len(s.objects) <= sw.MAX_OBJECTS
        pos = [o.position for o in s.objects]
        assert len(set(pos)) == len(pos), "two objects in one place"
        assert pos == sorted(pos, key=sw.POSITIONS.index), "objects must be in reading order"
        assert sw.Scene.from_dict(s.to_dict()) == s


def test_render_draws_each_object_in_its_colour_at_its_place():
    s = sw.Scene((sw.Obj("square", "red", "large", "left"), sw.Obj("circle", "blue", "large", "right")),
                 "white", seed=5)
    img = np.asarray(sw.render(s, 64)).astype(int)
    left, right = img[32, 12], img[32, 52]
    assert left[0] > 150 and left[2] < 100, left       # red on the left
    assert right[2] > 150 and right[0] < 100, right    # blue on the right
    assert img[5, 32].min() > 200                       # white background at the top


def test_notes_layout():
    s = sw.split("test", 1)[0]
    words = sw.notes(s).split()
    assert len(words) == sw.NOTES_LEN
    assert words[-1] == sw.COUNT_WORDS[len(s.objects)] and words[-2] == s.background
    assert set(words) <= set(sw.notes_vocab())


def test_descriptions_are_complete_and_captions_partial():
    rng = random.Random(0)
    scenes = sw.split("val", 300)
    assert all(exact_scene(sw.describe(s, rng), s) for s in scenes)
    caps = [sw.caption(s, rng) for s in scenes]
    assert not any(exact_scene(c, s) for c, s in zip(caps, scenes)), "a caption told everything"
    for c, s in zip(caps, scenes):
        assert c == c.lower()
        assert {m.shape for m in parse_mentions(c)} <= s.shapes, c
    assert any(f in c for c in caps for f in sw.FILLERS), "captions should carry some filler"


def test_qa_answers_are_true():
    rng = random.Random(1)
    for s in sw.split("val", 100):
        for q, a in sw.qa_pairs(s, rng):
            if q.startswith("What color is the ") and "background" not in q:
                shape = q.split()[-1].rstrip("?")
                (o,) = [o for o in s.objects if o.shape == shape]
                assert a == f"The {shape} is {o.colour}."
            if q.startswith("Is there a "):
                shape = q.split()[-1].rstrip("?")
                assert a.startswith("Yes") == (shape in s.shapes)


def test_corpus_is_text_only_chat_with_every_kind():
    docs = corpus.documents(400, seed=3)
    assert not any("<ImageHere>" in d or "<Img>" in d for d in docs)
    chats = [d for d in docs if "###Human:" in d]
    assert all(d.count("###Human:") == d.count("###Assistant:") for d in chats)
    assert all(d.endswith("###") for d in chats)
    text = "\n".join(docs)
    for marker in ("Once upon a time", "Buy the new", "Describe", "What color", "\n"):
        assert marker in text, marker
    assert len(chats) < len(docs), "catalogue records (notes + caption) are missing"


def test_patch_shape_labels_match_the_scene():
    for s in sw.split("val", 40):
        img, shape_map = sw.render_with_shapes(s, 64)
        assert np.array_equal(np.asarray(img), np.asarray(sw.render(s, 64)))
        labels = sw.patch_shapes(shape_map, 8)
        assert labels.shape == (64,)
        present = {sw.SHAPES[k - 1] for k in set(labels.tolist()) - {0}}
        assert present == s.shapes, (present, s)


def test_scene_at_matches_split():
    scenes = sw.split("test", 7)
    assert sw.scene_at("test", 6) == scenes[6] and sw.scene_at("test", 0) == scenes[0]
    assert sw.test_image(3).tobytes() == sw.render(scenes[3]).tobytes()
    with pytest.raises(ValueError, match="unknown split"):
        sw.scene_at("nope", 0)
