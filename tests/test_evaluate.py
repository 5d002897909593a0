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


def test_off_format_and_failure_rates():
    from minigpt4_min.evaluate import failure_rates, is_off_format
    assert is_off_format("There is a red circle. Human: what else?")
    assert is_off_format("<Img><ImageHere></Img> a circle.")
    assert not is_off_format("A human would call it a large red circle.")
    ok = "The image shows one shape. There is a large red circle on the left. The background is gray."
    rates = failure_rates([ok, "a circle", ok + " ###Human: hi"])
    assert rates["any"] == 2 / 3 and rates["too_short"] == 1 / 3 and rates["off_format"] == 1 / 3


def test_vqa_questions_and_grading():
    from minigpt4_min.evaluate import Question, vqa_accuracy, vqa_correct, vqa_questions
    scene = sw.Scene(objects=(sw.Obj("circle", "red", "large", "left"), sw.Obj("star", "blue", "small", "top")),
                     background="gray")
    qs = vqa_questions(scene)
    assert Question("What color is the circle?", "colour", "red") in qs
    assert Question("Where is the blue star?", "position", "top") in qs
    assert Question("How many shapes are there?", "count", "two") in qs
    col = Question("What color is the circle?", "colour", "red")
    assert vqa_correct("The circle is red.", col)
    assert not vqa_correct("The circle is red or blue.", col)      # hedging is wrong
    assert not vqa_correct("It is a circle.", col)
    pos = Question("Where is the blue star?", "position", "top")
    assert vqa_correct("The blue star is at the top.", pos) and not vqa_correct("It is on the left.", pos)
    cnt = Question("How many shapes are there?", "count", "two")
    assert vqa_correct("There are two shapes.", cnt) and vqa_correct("2", cnt)
    assert not vqa_correct("There are three shapes.", cnt)
    acc = vqa_accuracy(["The circle is red.", "at the top", "three"], [col, pos, cnt])
    assert acc["vqa_accuracy"] == 2 / 3 and acc["vqa_count"] == 0.0 and acc["vqa_colour"] == 1.0


def test_names_real_object():
    from minigpt4_min.evaluate import names_real_object
    scene = sw.Scene(objects=(sw.Obj("circle", "red", "large", "left"),), background="gray")
    assert names_real_object("Oh red circle, so large and proud,\nit sits alone.", scene)
    assert not names_real_object("Oh blue circle, so large and proud.", scene)      # wrong colour
    assert not names_real_object("A red square for sale!", scene)                   # absent shape
    assert not names_real_object("A circle, so round.", scene)                      # no colour named


def test_repetition_rates():
    from minigpt4_min.evaluate import repeated_sentence_rate, repetition
    t = "A red circle is on the left. A red circle is on the left. The background is gray."
    assert abs(repeated_sentence_rate(t) - 1 / 3) < 1e-9
    assert repeated_sentence_rate("One. Two.") == 0.0 and repeated_sentence_rate("") == 0.0
    r = repetition([t, "A blue star is at the top."])
    assert abs(r["repeated_sentence_rate"] - 1 / 6) < 1e-9 and r["repeated_ngram_rate"] > 0.1
