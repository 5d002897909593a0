"""Stage-2 data generation (describe + continue, resumable) and stage-2 batches."""
import pytest
import torch

from minigpt4_min import shapesworld as sw
from minigpt4_min import stage1, stage2, stage2_data
from minigpt4_min.config import STAGE2
from minigpt4_min.data import read_cc_sbu_align
from minigpt4_min.model import GenerationSettings


def _fs(model, n=6):
    return stage1.scene_features(model, sw.split("stage2", n), prefix="sw")


def test_describe_with_continuation_rule_and_resume(random_model, tmp_path, monkeypatch):
    torch.manual_seed(0)
    fs = _fs(random_model)
    cache = tmp_path / "gen.jsonl"
    recs = stage2_data.describe_with_continuation(random_model, fs, cache, min_tokens=10_000,
                                                  max_new_tokens=6, progress=False)
    assert [r["image_id"] for r in recs] == fs.keys
    assert all(r["continued"] for r in recs)                 # every answer is "short" at 10k tokens
    for r in recs:
        assert r["text"] == (r["first"] + " " + r["continuation"]).strip()
    # the continuation prompt is the paper's: prompt + answer + "###Human: Continue ###Assistant: "
    p = stage1.DETAIL_PROMPT + recs[0]["first"] + stage2_data.CONTINUE_PROMPT
    again = random_model.generate([p], feats=fs.feats[:1], settings=GenerationSettings(max_new_tokens=6))
    assert again[0] == recs[0]["continuation"]
    # re-running reads the cache instead of generating
    calls = []
    monkeypatch.setattr(random_model, "generate", lambda *a, **k: calls.append(1) or [])
    assert stage2_data.describe_with_continuation(random_model, fs, cache, min_tokens=10_000,
                                                  max_new_tokens=6, progress=False) == recs
    assert calls == []


def test_no_continuation_when_long_enough(random_model, tmp_path):
    fs = _fs(random_model, 3)
    recs = stage2_data.describe_with_continuation(random_model, fs, tmp_path / "g.jsonl", min_tokens=0,
                                                  max_new_tokens=5, progress=False)
    assert not any(r["continued"] for r in recs if r["first_tokens"] > 0)
    assert all(r["continuation"] == "" for r in recs if r["first_tokens"] > 0)


def test_changed_projection_is_a_new_cache_key(random_model, tmp_path):
    fs = _fs(random_model, 2)
    cache = tmp_path / "g.jsonl"
    stage2_data.describe_with_continuation(random_model, fs, cache, min_tokens=0, max_new_tokens=3, progress=False)
    with torch.no_grad():
        random_model.llama_proj.bias.add_(1.0)
    stage2_data.describe_with_continuation(random_model, fs, cache, min_tokens=0, max_new_tokens=3, progress=False)
    assert len(cache.read_text().splitlines()) == 4          # two generations, nothing reused


def test_export_and_instruction_batches(random_model, tmp_path):
    scenes = sw.split("stage2", 4)
    kept = [(f"sw{i}", sw.describe(s)) for i, s in enumerate(scenes)]
    images = {f"sw{i}": sw.render(s) for i, s in enumerate(scenes)}
    stage2_data.export(tmp_path / "align", kept, images.__getitem__)
    assert [(i, c) for i, _, c in read_cc_sbu_align(tmp_path / "align")] == kept
    fs = stage2.load_align_set(random_model, tmp_path / "align")
    assert fs.keys == [k for k, _ in kept] and fs.feats.shape[0] == 4
    get = stage2.instruction_batches(fs, 32)
    b = get(0, torch.Generator().manual_seed(0))
    assert b["end_sym"] == "###" and b["max_txt_len"] == 160
    assert set(b["prompts"]) == {stage2.prompt(i) for i in stage2.INSTRUCTIONS}   # all four drawn
    for p in b["prompts"]:
        assert p.startswith("###Human: <Img><ImageHere></Img> ") and p.endswith(" ###Assistant: ")
    b2 = get(0, torch.Generator().manual_seed(0))
    assert b2["prompts"] == b["prompts"] and b2["answers"] == b["answers"]     # deterministic
    loss = random_model.loss(b)
    assert torch.isfinite(loss)


def test_steps_scaled_to_the_set():
    assert stage2.steps_for(3439, 12) == 400                 # the paper's own stage 2
    assert STAGE2["full"].max_steps == stage2.steps_for(3439, STAGE2["full"].batch_size)   # presets agree
    assert stage2.steps_for(2162, 16) == round(stage2.PAPER_EPOCHS * 2162 / 16) == 189   # the default run's set
    assert stage2.steps_for(3439 * 2, 12) == 800             # twice the pairs, twice the steps
    assert stage2.steps_for(10, 16) == 100                   # a tiny set still gets a minimum
    assert stage2.steps_for(10, 16, min_steps=1) == 1
    for bad in ((0, 16), (100, 0)):
        with pytest.raises(ValueError, match="n_pairs > 0"):
            stage2.steps_for(*bad)


# ---------------------------------------------------------------- real images (notebook 03's image_dir)
def test_folder_features_reads_sorted_images_skips_unreadable_ones_by_name(random_model, tmp_path):
    from minigpt4_min.data import BadSampleWarning, load_image

    renders = {f"img{i}": sw.render(s, 64) for i, s in enumerate(sw.split("stage2", 4))}
    renders["img0"].save(tmp_path / "img0.png")
    renders["img1"].resize((90, 70)).save(tmp_path / "img1.jpg", quality=95)      # any size: resized
    (tmp_path / "img2.jpg").write_bytes(b"not a jpeg at all")                      # unreadable
    renders["img3"].save(tmp_path / "img3.JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    renders["img0"].save(tmp_path / "sub" / "a.jpg")                                # sub-folders: not read
    with pytest.warns(BadSampleWarning, match=r"img2\.jpg: not a readable image"):
        fs, paths, skipped = stage2_data.folder_features(random_model, tmp_path, n=3, batch_size=2)
    assert fs.keys == ["img0", "img1", "img3"] and list(paths) == fs.keys         # sorted, the first 3 readable
    assert paths["img3"] == tmp_path / "img3.JPEG" and fs.scenes == [None] * 3
    assert len(skipped) == 1 and str(tmp_path / "img2.jpg") in skipped[0]
    want = stage1.encode_images(random_model, [load_image(p) for p in paths.values()], fs.keys)
    assert torch.allclose(fs.feats, want.feats, atol=1e-6)                           # the eval transform
    few, _, _ = stage2_data.folder_features(random_model, tmp_path, n=1)
    assert few.keys == ["img0"]


def test_image_folder_errors_name_the_folder_or_files(random_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"image_dir {tmp_path / 'nope'}: no such folder"):
        stage2_data.image_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.jpg / \.jpeg / \.png / \.webp files in it \(sub-folders"):
        stage2_data.image_files(tmp_path / "empty")
    (tmp_path / "dup").mkdir()
    for name in ("a.jpg", "a.png"):
        sw.render(sw.split("stage2", 1)[0], 32).save(tmp_path / "dup" / name)
    with pytest.raises(ValueError, match=r"a\.jpg and a\.png would both be image_id 'a'"):
        stage2_data.image_files(tmp_path / "dup")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b.png").write_bytes(b"no")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"none of its 1 image files is readable"):
        stage2_data.folder_features(random_model, tmp_path / "bad", n=5)


def test_text_stats_measure_the_text_alone():
    good = "There is a large red circle on the left. A small blue square is on the right of it."
    rep = "A red circle. A red circle. A red circle. A red circle."
    st = stage2_data.text_stats([good, rep])
    assert st["failure_rate"] == 0.5 and st["mean_words"] == (19 + 12) / 2
    assert st["repeated_sentence_rate"] > 0.3 and 0 < st["repeated_ngram_rate"] < 1
    assert stage2_data.text_stats([]) == {"repeated_ngram_rate": 0.0, "repeated_sentence_rate": 0.0,
                                          "failure_rate": 0.0, "mean_words": 0.0}
