"""Metrics on hand-made examples whose right answers are known."""
import pytest

from minigpt4_min import shapesworld as sw
from minigpt4_min.evaluate import (Mention, caption_metrics, exact_scene, failure_modes,
                                   parse_mentions, repeated_ngram_rate)

SCENE = sw.Scene((sw.Obj("circle", "red", "large", "left"), sw.Obj("star", "blue", "small", "top")), "gray")


def test_parse_mentions():
    assert parse_mentions("There is a large red circle on the left. A small blue star is at the top.") == [
        Mention("circle", "red", "large", "left"), Mention("star", "blue", "small", "top")]
    assert parse_mentions("two shapes on gray background") == []
    assert parse_mentions("a red circle and a blue star") == [Mention("circle", "red"), Mention("star", "blue")]


def test_caption_metrics_count_right_wrong_and_hallucinated():
    texts = ["a red circle", "a green circle", "a blue square", "large red circle and small blue star"]
    m = caption_metrics(texts, [SCENE] * 4)
    # stated attributes on present objects: red(1) | green(0) | - | large red, small blue (4) -> 5 / 6
    assert m["attribute_accuracy"] == pytest.approx(5 / 6)
    assert m["hallucination_free"] == pytest.approx(3 / 4)          # "blue square" is absent
    assert m["chair_i"] == pytest.approx(1 / 5)
    assert m["object_recall"] == pytest.approx((1 + 1 + 0 + 2) / 8)


def test_exact_scene_needs_everything_right():
    good = "A large red circle is on the left. There is a small blue star at the top. The background is gray."
    assert exact_scene(good, SCENE)
    assert not exact_scene(good.replace("gray", "white"), SCENE)
    assert not exact_scene(good.replace("small blue", "large blue"), SCENE)
    assert not exact_scene(good + " There is a green square.", SCENE)


def test_failure_modes():
    assert failure_modes("")["empty"]
    assert failure_modes("a red circle.")["too_short"]
    rep = "There is a red circle. There is a red circle. There is a red circle. There is a red circle."
    assert failure_modes(rep)["repetitive"] and repeated_ngram_rate(rep) > 0.5
    assert failure_modes("There is a large red circle on the left and a small blue star at the")["broken"]
    ok = "There is a large red circle on the left. A small blue star is at the top. The background is gray."
    assert not failure_modes(ok)["any"]
