"""The chat measurements of notebook 05: the demo's prompt, POPE's balance, the grading."""
import random

import pytest

from minigpt4_min import chat_eval, stage1
from minigpt4_min import shapesworld as sw
from minigpt4_min import wordings as wd
from minigpt4_min.conversation import SYSTEM
from minigpt4_min.evaluate import has_filler, has_raw_notes, pope_scores


def test_fresh_chat_prompt_is_the_demos():
    assert chat_eval.fresh_chat_prompt("What is this?") == (
        SYSTEM + "###Human: <Img><ImageHere></Img> What is this?###Assistant: ")


def test_pope_scores():
    s = pope_scores(["Yes, there is.", "yes", "No, there is no star.", "Maybe."], ["yes", "no", "no", "yes"])
    assert s["accuracy"] == 0.5 and s["yes_share"] == 0.5
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["f1"] == pytest.approx(0.5)
    assert pope_scores(["yes"] * 4, ["yes", "yes", "no", "no"])["accuracy"] == 0.5   # all-yes: chance


def test_leak_detectors():
    assert has_raw_notes("left none none none top small red circle")
    assert has_raw_notes("I see center large blue star here")
    assert not has_raw_notes("There is a large blue star in the center.")
    assert has_filler("a red circle free download") and has_filler("stock image of a star")
    assert not has_filler("A photo of a red circle on a gray background.")


@pytest.fixture(scope="module")
def scenes():
    return sw.split("test", 12)


def test_pope_is_balanced_and_its_negatives_are_false(random_model, scenes):
    fs = stage1.scene_features(random_model, scenes)
    scores, rows = chat_eval.pope(random_model, fs, seed=1)
    assert len(rows) == 4 * len(scenes)
    assert sum(truth == "yes" for *_, truth, _ in rows) == 2 * len(scenes)          # balanced
    for i, setting, text, truth, _ in rows:
        words = text.rstrip("?").split()
        shape, colour = words[-4], words[-5]
        present = any(o.shape == shape and (setting == "random" or o.colour == colour) for o in scenes[i].objects)
        assert present == (truth == "yes"), text
        if setting == "adversarial" and truth == "no":          # a shape that IS there, in a colour it is not
            assert shape in scenes[i].shapes
    assert 0.0 <= scores["all/accuracy"] <= 1.0 and 0.0 <= scores["all/yes_share"] <= 1.0


def test_turn_check_asks_the_same_text_on_both_images(random_model, scenes):
    for i in range(6):
        kind = chat_eval.TURN_KINDS[i % 3]
        a = wd.ask(scenes[i], kind, random.Random(i))
        b = wd.ask(scenes[i + 6], kind, random.Random(i))
        assert a.text == b.text
    out = chat_eval.turn_check(random_model, scenes[:3], scenes[3:6], max_new_tokens=4, default_new_tokens=120)
    assert out["n"] == 3 and out["longest_5turn_positions"] > random_model.cfg.num_query_tokens
    assert out["cut_at_default"] == 0          # short answers: far below 512 - 120 positions


def test_wording_accuracy_uses_the_split(random_model, scenes):
    fs = stage1.scene_features(random_model, scenes[:4])
    acc, rows = chat_eval.wording_accuracy(random_model, fs, "heldout", seed=0)
    assert rows and all(wd.uses_heldout(q.text) for _, q, _ in rows)
    assert set(acc) >= {"all", "count", "yesno"}
