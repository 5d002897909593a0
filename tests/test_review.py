"""Stage-2 review: persisted, resumable decisions; ground-truth problems; the auto reviewer; the widget."""
import io
import json
from collections import Counter

import pytest
from PIL import Image

from minigpt4_min import shapesworld as sw
from minigpt4_min.review import ReviewItem, ReviewSession, auto_review, review_problems
from minigpt4_min.widgets import ReviewWidget

SCENE = sw.Scene((sw.Obj("circle", "red", "large", "left"), sw.Obj("square", "blue", "small", "right")), "gray")
GOOD = ("There is a large red circle on the left. A small blue square is on the right. "
        "The background is gray.")


def make_items(n=4):
    return [ReviewItem(f"img{i}", f"raw text {i}", f"refined text {i}.") for i in range(n)]


def on_disk(path):
    return json.loads(path.read_text())["decisions"]


# ----------------------------------------------------------------------------- session
def test_decisions_persist_atomically_and_resume(tmp_path):
    path = tmp_path / "review.json"
    s = ReviewSession(make_items(), path)
    assert s.progress() == (0, 4) and s.next_unreviewed() == 0 and not path.exists()
    s.decide("img0", "accept")
    assert on_disk(path)["img0"]["caption"] == "refined text 0."        # on disk at once
    s.decide("img1", "edit", caption="  a better caption.  ")
    s.decide("img2", "reject", reason="wrong colour")
    assert sorted(on_disk(path)) == ["img0", "img1", "img2"]
    assert [p.name for p in tmp_path.iterdir()] == ["review.json"]       # no .tmp left behind

    again = ReviewSession(make_items(), path)
    assert again.progress() == (3, 4)
    assert again.next_unreviewed() == 3 and again.next_unreviewed(1) == 3
    assert again.decision("img1")["caption"] == "a better caption."
    assert again.decision("img2")["reason"] == "wrong colour" and again.decision("img3") is None
    assert again.kept() == [("img0", "refined text 0."), ("img1", "a better caption.")]
    summ = again.summary()
    assert summ["decisions"] == {"accept": 1, "edit": 1, "reject": 1}
    assert summ["reviewers"] == {"human": 3} and summ["reject_reasons"] == Counter({"wrong colour": 1})
    again.decide("img3", "accept")
    assert again.next_unreviewed() is None and again.progress() == (4, 4)


def test_next_unreviewed_wraps(tmp_path):
    s = ReviewSession(make_items(), tmp_path / "r.json")
    s.decide("img3", "accept")
    s.decide("img0", "accept")
    assert s.next_unreviewed(3) == 1       # past the end -> back to the start


def test_unknown_ids_in_file_kept_and_ignored(tmp_path):
    path = tmp_path / "r.json"
    ReviewSession(make_items(6), path).decide("img5", "reject", reason="blurry")
    s = ReviewSession(make_items(2), path)
    assert s.progress() == (0, 2) and s.summary()["decided"] == 0
    s.decide("img0", "accept")
    assert set(on_disk(path)) == {"img0", "img5"}                        # img5 not lost


def test_two_sessions_on_one_file_do_not_erase_each_other(tmp_path):
    path = tmp_path / "r.json"
    a, b = ReviewSession(make_items(), path), ReviewSession(make_items(), path)
    a.decide("img0", "accept")
    b.decide("img1", "reject")
    a.decide("img2", "accept")
    assert set(on_disk(path)) == {"img0", "img1", "img2"}


def test_bad_input_is_refused_clearly(tmp_path):
    s = ReviewSession(make_items(), tmp_path / "r.json")
    with pytest.raises(ValueError, match="'maybe'.*accept"):
        s.decide("img0", "maybe")
    with pytest.raises(ValueError, match="'nope'"):
        s.decide("nope", "accept")
    with pytest.raises(ValueError, match="edit"):
        s.decide("img0", "edit", caption="   ")
    with pytest.raises(ValueError, match="edit"):
        s.decide("img0", "accept", caption="something else")
    assert s.progress() == (0, 4) and not (tmp_path / "r.json").exists()
    with pytest.raises(ValueError, match="duplicate"):
        ReviewSession([ReviewItem("a", "", ""), ReviewItem("a", "", "")], tmp_path / "x.json")


def test_corrupt_file_names_the_path_and_is_left_alone(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"decisions": {"img0": ')
    with pytest.raises(ValueError, match="r.json.*not a valid JSON"):
        ReviewSession(make_items(), path)
    assert path.read_text() == '{"decisions": {"img0": '
    path.write_text('{"decisions": {"img0": {"decision": "keep"}}}')
    with pytest.raises(ValueError, match="img0"):
        ReviewSession(make_items(), path)


# ----------------------------------------------------------------------------- ground truth
def test_correct_full_descriptions_have_no_problems():
    assert review_problems(GOOD, SCENE) == []
    for s in sw.split("test", 5):
        assert review_problems(sw.describe(s), s) == [], sw.describe(s)


@pytest.mark.parametrize("text, problem", [
    (GOOD + " There is also a green star at the top.", "mentions absent green star"),
    (GOOD.replace("small blue", "small yellow"), "wrong colour: says yellow square, it is blue"),
    (GOOD.replace("large red", "small red"), "wrong size: says small circle, it is large"),
    (GOOD.replace("circle on the left", "circle at the top"),
     "wrong position: says circle at the top, it is on the left"),
    (GOOD.replace("is gray", "is white"), "wrong background: says white, it is gray"),
    ("There are three shapes. " + GOOD, "wrong count: says three shapes, there are two"),
    ("There is a large red circle on the left. The background is gray. It is a nice picture.",
     "misses the small blue square on the right"),
    ("A large red circle.", "too short (4 words)"),
    ("", "empty"),
    (GOOD.rstrip(".") + " and a", "cut off (the last sentence is unfinished)"),
    ("There is a large red circle on the left. " * 4 + "A small blue square is on the right. The background is gray.",
     "repetitive"),
])
def test_each_problem_is_found(text, problem):
    assert problem in review_problems(text, SCENE)


def test_incomplete_is_fine_when_completeness_not_required():
    text = "There is a large red circle on the left and nothing else worth saying about it."
    assert "misses the small blue square on the right" in review_problems(text, SCENE)
    assert review_problems(text, SCENE, require_complete=False) == []


def test_shared_shape_compared_with_best_matching_object():
    scene = sw.Scene((sw.Obj("circle", "red", "large", "left"), sw.Obj("circle", "blue", "small", "right")), "black")
    text = ("There is a small blue circle on the right. A large red circle is on the left. "
            "Everything is on a black background.")
    assert review_problems(text, scene) == []
    assert review_problems(text.replace("small blue", "small green"), scene) == [
        "wrong colour: says green circle, it is blue"]


# ----------------------------------------------------------------------------- auto review
def test_auto_review_keeps_human_decisions_and_records_reasons(tmp_path):
    scenes = {f"s{i}": s for i, s in enumerate(sw.split("test", 4))}
    items = [ReviewItem(k, "raw", sw.describe(s)) for k, s in scenes.items()]
    items[1].refined = items[1].refined.replace(f"is {scenes['s1'].background}", "is purple-ish").replace(
        f"a {scenes['s1'].background} background", "a purple-ish background")
    items[2].refined = "A star."
    items[3].refined = "Nothing to see here, really, just nothing at all in this image of mine."
    path = tmp_path / "r.json"
    s = ReviewSession(items, path)
    s.decide("s3", "edit", caption=sw.describe(scenes["s3"]))          # a human was here first
    summ = auto_review(s, scenes)
    assert summ["decided"] == 4 and summ["reviewers"] == {"human": 1, "auto": 3}
    assert s.decision("s3")["reviewer"] == "human" and s.decision("s3")["decision"] == "edit"
    assert s.decision("s0")["decision"] == "accept"
    assert s.decision("s1")["decision"] == "reject" and "does not say the background" in s.decision("s1")["reason"]
    r2 = s.decision("s2")
    assert r2["decision"] == "reject" and "too short (2 words)" in r2["reason"].split("; ")
    assert summ["reject_reasons"]["too short (2 words)"] == 1
    assert ReviewSession(items, path).progress() == (4, 4)                # saved to the same file
    with pytest.raises(ValueError, match="no scene"):
        auto_review(ReviewSession(items, tmp_path / "other.json"), {})


# ----------------------------------------------------------------------------- widget
@pytest.fixture
def widget_setup(tmp_path):
    scenes = {f"s{i}": s for i, s in enumerate(sw.split("test", 4))}
    items = [ReviewItem(k, f"raw {k}", sw.describe(s)) for k, s in scenes.items()]
    return items, tmp_path / "review.json", lambda image_id: sw.render(scenes[image_id])


def test_widget_records_edits_rejects_and_moves_on(widget_setup):
    items, path, load = widget_setup
    w = ReviewWidget(ReviewSession(items, path), load)
    assert w.index == 0 and w.progress.value == "0 of 4 reviewed"
    assert w.text.value == items[0].refined and w.raw.value == "raw s0" and w.raw.disabled
    assert Image.open(io.BytesIO(w.image.value)).size == (256, 256)      # 64 px shown 4x
    w.text.value = "A corrected caption."
    w.accept_button.click()                                               # changed text -> edit
    assert on_disk(path)["s0"]["decision"] == "edit" and on_disk(path)["s0"]["caption"] == "A corrected caption."
    assert w.index == 1 and w.progress.value == "1 of 4 reviewed" and w.text.value == items[1].refined
    w.accept_button.click()                                               # unchanged -> accept
    assert on_disk(path)["s1"]["decision"] == "accept"
    w.reason.value = "wrong colour"
    w.reject_button.click()
    assert on_disk(path)["s2"] == {**on_disk(path)["s2"], "decision": "reject", "reason": "wrong colour"}
    assert w.index == 3 and w.progress.value == "3 of 4 reviewed" and w.reason.value == ""
    w.prev_button.click()
    assert w.index == 2 and "reject" in w.status.value and w.reason.value == "wrong colour"
    w.next_button.click()
    assert w.index == 3 and w.status.value == "not reviewed yet"
    w.text.value = "  "
    w.edit_button.click()                                                 # empty edit: refused, shown
    assert "not saved" in w.message.value and "s3" not in on_disk(path) and w.index == 3
    w.text.value = "My own words."
    w.edit_button.click()
    assert on_disk(path)["s3"]["caption"] == "My own words." and w.progress.value == "4 of 4 reviewed"
    assert "All 4 items reviewed" in w.message.value
    assert w._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]["model_id"] == w.ui.model_id


def test_reopened_widget_starts_at_first_unreviewed(widget_setup):
    items, path, load = widget_setup
    s = ReviewSession(items, path)
    s.decide("s0", "accept")
    s.decide("s2", "reject")
    w = ReviewWidget(ReviewSession(items, path), load)
    assert w.index == 1 and w.progress.value == "2 of 4 reviewed"
    w.accept_button.click()
    assert w.index == 3                                                   # skips the decided s2
    w.prev_button.click()
    w.prev_button.click()
    assert w.index == 1 and w.status.value.startswith("decision: accept")


def test_widget_survives_an_unreadable_image(widget_setup):
    items, path, _ = widget_setup

    def load(image_id):
        raise OSError(f"{image_id}.jpg: truncated")
    w = ReviewWidget(ReviewSession(items, path), load)
    assert "s0.jpg: truncated" in w.message.value and w.image.value == b""
    w.reject_button.click()
    assert on_disk(path)["s0"]["decision"] == "reject" and w.index == 1


def test_off_format_text_is_a_problem():
    assert any(p.startswith("off format") for p in review_problems(GOOD + " ###Human: thanks!", SCENE))


def test_reason_kind_groups_reasons():
    from minigpt4_min.review import reason_kind
    assert reason_kind("wrong colour: says red square, it is blue") == "wrong colour"
    assert reason_kind("mentions absent green star") == "mentions absent"
    assert reason_kind("too short (4 words)") == "too short"
    assert reason_kind("misses the small blue square on the right") == "misses the"
    assert reason_kind("repetitive") == "repetitive"


def test_drop_misaligned_removes_only_false_sentences():
    from minigpt4_min.review import drop_misaligned
    scene = sw.Scene(objects=(sw.Obj("circle", "red", "large", "left"), sw.Obj("star", "blue", "small", "top")),
                     background="gray")
    text = ("There is a large red circle on the left. I can see a small green square on the right. "
            "A small blue star is on the left. The background is white. The image shows two shapes.")
    kept, removed = drop_misaligned(text, scene)
    assert kept == "There is a large red circle on the left. The image shows two shapes."
    assert any("absent" in r for r in removed) and any("wrong position" in r for r in removed)
    assert any("wrong background" in r for r in removed)
    assert drop_misaligned(sw.describe(scene), scene) == (sw.describe(scene), [])


def test_auto_review_edit_mode(tmp_path):
    from minigpt4_min.review import ReviewItem, ReviewSession, auto_review
    scene = sw.Scene(objects=(sw.Obj("circle", "red", "large", "left"),), background="gray")
    good = "There is a large red circle on the left. Everything is on a gray background."
    items = [ReviewItem("a", good + " A blue star is at the top.", good + " A blue star is at the top."),
             ReviewItem("b", "A green star.", "A green star."),
             ReviewItem("c", good, good)]
    s = ReviewSession(items, tmp_path / "d.json")
    summary = auto_review(s, {"a": scene, "b": scene, "c": scene}, require_complete=True, edit=True)
    assert s.decision("a")["decision"] == "edit" and s.decision("a")["caption"] == good
    assert "absent" in s.decision("a")["reason"]
    assert s.decision("b")["decision"] == "reject" and s.decision("c")["decision"] == "accept"
    assert summary["kept"] == 2 and s.kept() == [("a", good), ("c", good)]


# ----------------------------------------------------------------------------- no ground truth
def test_auto_review_text_keeps_what_passes_the_failure_modes(tmp_path):
    from minigpt4_min.review import auto_review_text, text_problems

    long_ok = "A dog runs along a wide sandy beach under a pale blue sky, chasing a red ball into the waves."
    items = [ReviewItem("ok", "raw", long_ok), ReviewItem("short", "raw", "A dog."),
             ReviewItem("cut", "raw", long_ok.rstrip(".") + " and then"), ReviewItem("empty", "raw", ""),
             ReviewItem("human", "raw", "A dog.")]
    s = ReviewSession(items, tmp_path / "d.json")
    s.decide("human", "edit", caption=long_ok)                     # a human was here first
    summ = auto_review_text(s)
    assert summ["decided"] == 5 and summ["reviewers"] == {"human": 1, "auto-text": 4}
    assert s.kept() == [("ok", long_ok), ("human", long_ok)]
    assert s.decision("short")["reason"] == "too short (2 words)"
    assert s.decision("cut")["reason"] == "cut off (the last sentence is unfinished)"
    assert s.decision("empty")["reason"] == "empty"
    assert ReviewSession(items, tmp_path / "d.json").progress() == (5, 5)     # on disk
    # the text checks are exactly the text part of the ground-truth reviewer's
    for text in ("", "A large red circle.", GOOD, GOOD.rstrip(".") + " and a"):
        assert text_problems(text) == [p for p in review_problems(text, SCENE, require_complete=False)
                                       if p == "empty" or not p.startswith(("mentions", "wrong", "misses"))]
