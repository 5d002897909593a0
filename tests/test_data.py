"""Tests for minigpt4_min.data: image loading, preprocessing, shards, cc_sbu_align folders."""
from __future__ import annotations

import gc
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4_min.config import get_config
from minigpt4_min.data import (BadImageError, BadSampleWarning, EmptyShardWarning, ImageProcessor,
                               ShardStats, clean_caption, load_image, read_cc_sbu_align, read_shards,
                               write_cc_sbu_align, write_shards)

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers
def noise_image(seed: int, size=(40, 30)) -> Image.Image:
    """A smooth random RGB image (JPEG-friendly, so round trips stay pixel-close)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR header is rewritten to claim `width` x `height`."""
    data = bytearray(encode(Image.new("L", (2, 2)), "PNG"))
    ihdr = 8 + 8                                   # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def samples(n: int):
    return [(f"{i:05d}", noise_image(i), {"caption": f"caption number {i}", "n": i})
            for i in range(n)]


# ---------------------------------------------------------------- shards
def test_shard_round_trip(tmp_path):
    src = samples(25)
    paths = write_shards(src, tmp_path, shard_size=10)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    stats = ShardStats()
    got = list(read_shards(paths, stats))
    assert [s.key for s in got] == [k for k, _, _ in src]
    assert [s.meta for s in got] == [m for _, _, m in src]
    assert got[3].caption == "caption number 3"
    assert got[12].url.endswith("shard-000001.tar")
    for s, (_, img, _) in zip(got, src):
        assert s.image.mode == "RGB" and s.image.size == img.size
        diff = np.abs(np.asarray(s.image, np.int16) - np.asarray(img, np.int16)).mean()
        assert diff < 3
    assert (stats.ok, stats.skipped, stats.reasons) == (25, 0, [])


def test_read_shards_accepts_directory_and_brace_pattern(tmp_path):
    write_shards(samples(25), tmp_path, shard_size=10)
    keys = [s.key for s in read_shards(tmp_path)]
    assert keys == [f"{i:05d}" for i in range(25)]
    pattern = str(tmp_path / "shard-{000001..000002}.tar")
    assert [s.key for s in read_shards(pattern)] == keys[10:]


def test_read_shards_missing_shard_raises_before_iterating(tmp_path):
    write_shards(samples(3), tmp_path)
    missing = tmp_path / "nope-000000.tar"
    with pytest.raises(FileNotFoundError, match="nope-000000.tar"):
        read_shards([tmp_path / "shard-000000.tar", missing])     # no next() needed
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        read_shards(tmp_path / "empty")


def test_write_shards_is_atomic_when_interrupted(tmp_path):
    seen_mid_shard = []

    def interrupted():
        yield from samples(15)
        seen_mid_shard.extend(sorted(p.name for p in tmp_path.iterdir()))  # as a kill would leave it
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(interrupted(), tmp_path, shard_size=10)
    assert seen_mid_shard == ["shard-000000.tar", "shard-000001.tar.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    assert len(list(read_shards(tmp_path))) == 10


def test_write_shards_refuses_existing_unless_overwrite(tmp_path):
    write_shards(samples(25), tmp_path, shard_size=10)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(samples(5), tmp_path, shard_size=10)
    paths = write_shards(samples(5), tmp_path, shard_size=10, overwrite=True)
    assert sorted(tmp_path.glob("*.tar")) == paths                  # stale shards removed
    assert len(list(read_shards(tmp_path))) == 5


def test_write_shards_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="caption"):
        write_shards([("a", noise_image(0), {"text": "x"})], tmp_path)
    with pytest.raises(ValueError, match="a.b"):
        write_shards([("a.b", noise_image(0), {"caption": "x"})], tmp_path / "2")
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([("a", noise_image(0), {"caption": "x"})] * 2, tmp_path / "3")


def test_bad_samples_are_skipped_counted_and_warned(tmp_path):
    import webdataset as wds

    good_jpg = encode(noise_image(1), "JPEG")
    cap = json.dumps({"caption": "fine"}).encode()
    bad = {
        "corrupt": {"jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "json": cap},
        "truncated": {"jpg": good_jpg[: len(good_jpg) // 2], "json": cap},
        "textfile": {"jpg": b"this is not an image at all\n" * 10, "json": cap},
        "nojson": {"jpg": good_jpg},
        "nocaption": {"jpg": good_jpg, "json": json.dumps({"url": "x"}).encode()},
        "badjson": {"jpg": good_jpg, "json": b"{not json"},
        "noimage": {"json": cap},
        "intcaption": {"jpg": good_jpg, "json": json.dumps({"caption": 3}).encode()},
    }
    good = {"good1": {"jpg": good_jpg, "json": cap},
            "good2": {"png": encode(noise_image(2).convert("L"), "PNG"), "json": cap},
            "good3": {"webp": encode(noise_image(3), "WEBP"), "json": cap}}
    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path), encoder=False) as tw:
        for key, entry in [("good1", good["good1"]), *bad.items(), *list(good.items())[1:]]:
            tw.write({"__key__": key, **entry})

    stats = ShardStats()
    with pytest.warns(BadSampleWarning) as record:
        got = list(read_shards([path], stats))
    assert [s.key for s in got] == ["good1", "good2", "good3"]
    assert all(s.image.mode == "RGB" for s in got)
    assert stats.ok == 3 and stats.skipped == len(bad) == 8
    assert len(stats.reasons) == 8
    for key, reason in zip(bad, stats.reasons):
        assert repr(key) in reason and str(path) in reason
    assert "json" in stats.reasons[3] and "caption" in stats.reasons[4]
    warned = [str(w.message) for w in record if issubclass(w.category, BadSampleWarning)]
    assert warned == stats.reasons


def test_img2dataset_txt_captions_are_read_and_a_sample_without_caption_is_named(tmp_path):
    """img2dataset writes KEY.jpg + KEY.txt (the caption) + KEY.json (url, status, ...): the
    caption comes from the json when it has one, else from the txt."""
    import webdataset as wds

    jpg = encode(noise_image(1), "JPEG")
    entries = {
        "txtonly": {"jpg": jpg, "txt": "  A dog on a beach.\n".encode()},
        "img2ds": {"jpg": jpg, "txt": b"a red car", "json": json.dumps({"url": "http://x/1.jpg",
                                                                        "status": "success"}).encode()},
        "both": {"jpg": jpg, "txt": b"from the txt", "json": json.dumps({"caption": "from the json"}).encode()},
        "nocaption": {"jpg": jpg, "json": json.dumps({"url": "u"}).encode()},
        "bare": {"jpg": jpg},
        "badtxt": {"jpg": jpg, "txt": b"\xff\xfe not utf-8 \x80"},
    }
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path), encoder=False) as tw:
        for key, entry in entries.items():
            tw.write({"__key__": key, **entry})
    stats = ShardStats()
    with pytest.warns(BadSampleWarning):
        got = {s.key: s for s in read_shards(str(tmp_path / "{00000..00000}.tar"), stats)}
    assert {k: s.caption for k, s in got.items()} == {"txtonly": "A dog on a beach.", "img2ds": "a red car",
                                                     "both": "from the json"}
    assert got["img2ds"].meta == {"url": "http://x/1.jpg", "status": "success", "caption": "a red car"}
    assert stats.ok == 3 and stats.skipped == 3
    nocap, bare, badtxt = stats.reasons
    assert f"{path}: sample 'nocaption' skipped: no caption: no txt entry and json has no string 'caption'" == nocap
    assert f"{path}: sample 'bare' skipped: no caption: no txt entry and no json entry" == bare
    assert "'badtxt'" in badtxt and "txt caption is not UTF-8 text" in badtxt


@pytest.mark.parametrize("kind", ["zero bytes", "tar without members"])
def test_empty_shard_is_counted_and_warned_by_name(tmp_path, kind):
    import tarfile

    write_shards(samples(4), tmp_path, shard_size=2)             # shard-000000, shard-000001
    empty = tmp_path / "shard-000002.tar"
    if kind == "zero bytes":
        empty.write_bytes(b"")
    else:
        tarfile.open(empty, "w").close()                       # a valid tar, no samples
    stats = ShardStats()
    with pytest.warns(EmptyShardWarning, match="shard-000002.tar") as record:
        got = list(read_shards(tmp_path, stats))
    assert len(got) == 4 and stats.ok == 4 and stats.skipped == 0
    assert stats.empty_shards == [str(empty)]
    assert [str(w.message) for w in record if w.category is EmptyShardWarning] == [
        f"{empty}: empty shard, no samples"]
    assert "1 empty shard" in str(stats)


def _warnings_of(run) -> list[warnings.WarningMessage]:
    """Every warning raised while `run()` runs and its garbage is collected."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run()
        gc.collect()
    return record


def test_read_shards_leaves_no_file_open(tmp_path):
    write_shards(samples(6), tmp_path, shard_size=2)
    (tmp_path / "shard-000003.tar").write_bytes(b"")             # an empty one too

    def stop_early():                                            # the caller breaks off mid-shard
        it = read_shards(tmp_path)
        next(it)
        del it

    for run in (lambda: list(read_shards(tmp_path)), stop_early):
        record = _warnings_of(run)
        assert [str(w.message) for w in record if issubclass(w.category, ResourceWarning)] == []
    assert [w.category for w in _warnings_of(lambda: list(read_shards(tmp_path)))] == [EmptyShardWarning]


def test_split_by_node_reads_this_ranks_shards(tmp_path, monkeypatch):
    write_shards(samples(8), tmp_path, shard_size=2)             # 4 shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [s.key for s in read_shards(tmp_path, split_by_node=True)] == ["00002", "00003", "00006", "00007"]
    with pytest.raises(ValueError, match="nodesplitter"):       # several ranks must split
        list(read_shards(tmp_path))


# ---------------------------------------------------------------- load_image
def gradient(mode_size=(24, 16)) -> np.ndarray:
    w, h = mode_size
    return (np.arange(w * h).reshape(h, w) % 256).astype(np.uint8)


MODES = {
    "L": lambda: Image.fromarray(gradient()),
    "RGBA": lambda: Image.new("RGBA", (24, 16), (255, 0, 0, 128)),
    "CMYK": lambda: Image.new("CMYK", (24, 16), (0, 255, 255, 0)),
    "P": lambda: Image.fromarray(gradient()).convert("P"),
    "I;16": lambda: Image.fromarray(gradient().astype(np.uint16) * 250),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_load_image_modes_become_rgb(mode):
    img = MODES[mode]()
    assert img.mode == mode
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    for src in (img, encode(img, fmt)):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (24, 16)


def test_load_image_composites_transparency_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))        # fully transparent red
    img.putpixel((1, 1), (0, 0, 255, 255))                   # one opaque blue pixel
    out = load_image(encode(img, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 0, 255)
    half = load_image(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))
    assert 120 <= half.getpixel((0, 0))[0] <= 135           # black at 50% over white


@pytest.mark.parametrize("size, why", [((20000, 20000), "exceeds limit"),   # PIL's bomb check
                                       ((9000, 9000), "9000x9000")])      # MAX_IMAGE_PIXELS
def test_load_image_refuses_huge_images(tmp_path, size, why):
    path = tmp_path / "huge.png"
    path.write_bytes(png_claiming_size(*size))
    with pytest.raises(BadImageError, match="huge.png") as err:
        load_image(path)
    assert why in str(err.value)


def test_load_image_errors_name_the_source(tmp_path):
    with pytest.raises(BadImageError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(BadImageError, match="notes.jpg"):
        load_image(tmp_path / "notes.jpg")
    with pytest.raises(BadImageError, match="float"):
        load_image(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(BadImageError, match="shape"):
        load_image(np.zeros((2, 8, 8, 3), dtype=np.uint8))


# ---------------------------------------------------------------- ImageProcessor
def test_image_processor_eval_shape_and_determinism():
    cfg = get_config("tiny")
    proc = ImageProcessor(cfg)
    img = noise_image(5, (100, 70))
    x = proc(img)
    assert x.shape == (3, cfg.image_size, cfg.image_size) and x.dtype == torch.float32
    assert torch.equal(x, proc(img))
    assert proc.batch([img, img]).shape == (2, 3, cfg.image_size, cfg.image_size)
    white = proc(Image.new("RGB", (10, 10), (255, 255, 255)))
    expect = (1 - torch.tensor(cfg.image_mean)) / torch.tensor(cfg.image_std)
    assert torch.allclose(white[:, 0, 0], expect, atol=1e-5)


def test_image_processor_batch_equals_one_by_one():
    cfg = get_config("tiny")
    proc = ImageProcessor(cfg)
    same_size = [noise_image(i, (cfg.image_size, cfg.image_size)) for i in range(3)]   # the stacked path
    mixed = same_size + [noise_image(9, (100, 70)).convert("L")]                        # the per-image path
    for images in (same_size, mixed):
        assert torch.equal(proc.batch(images), torch.stack([proc(i) for i in images]))


def test_image_processor_random_resized_crop_is_seeded():
    cfg = get_config("tiny", train_transform="random_resized_crop")
    proc = ImageProcessor(cfg, train=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    a = proc(img, generator=torch.Generator().manual_seed(1))
    b = proc(img, generator=torch.Generator().manual_seed(1))
    c = proc(img, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, cfg.image_size, cfg.image_size)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, ImageProcessor(cfg, train=False)(img))


# ---------------------------------------------------------------- clean_caption
def test_clean_caption():
    assert clean_caption('A Cat. Sat! "on" (the) *mat* #1: yes; ~ok') == "a cat sat on the mat 1 yes ok"
    assert clean_caption("One two three four", max_words=2) == "one two"
    assert clean_caption("  spaced \t out \n") == "spaced out"
    assert clean_caption("keep, commas - and 'quotes'") == "keep, commas - and 'quotes'"


# ---------------------------------------------------------------- cc_sbu_align
def test_cc_sbu_align_round_trip(tmp_path):
    items = [("2", noise_image(2), "A red ball."), ("10", noise_image(10), "Two cubes.")]
    ann_path = write_cc_sbu_align(tmp_path / "align", items)
    assert ann_path == tmp_path / "align" / "filter_cap.json"
    raw = ann_path.read_text()
    assert json.loads(raw) == {"annotations": [{"image_id": "2", "caption": "A red ball."},
                                               {"image_id": "10", "caption": "Two cubes."}]}
    assert raw.startswith('{\n  "annotations"')                     # indent=2
    assert not list((tmp_path / "align").rglob("*.tmp"))
    got = read_cc_sbu_align(tmp_path / "align")
    assert [(i, c) for i, _, c in got] == [("2", "A red ball."), ("10", "Two cubes.")]
    assert got[1][1] == tmp_path / "align" / "image" / "10.jpg"
    assert load_image(got[0][1]).size == (40, 30)


def write_ann(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "filter_cap.json").write_text(text)
    return folder


def test_cc_sbu_align_missing_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="filter_cap.json"):
        read_cc_sbu_align(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("{not json", "invalid JSON"),
    ('{"images": []}', "annotations"),
    ('{"annotations": [{"caption": "no id"}]}', "annotation 0"),
    ('{"annotations": [{"image_id": "1"}]}', "annotation 0"),
    ('{"annotations": [{"image_id": "1", "caption": null}]}', "annotation 0"),
])
def test_cc_sbu_align_malformed_json(tmp_path, text, match):
    write_ann(tmp_path, text)
    with pytest.raises(ValueError, match=match) as err:
        read_cc_sbu_align(tmp_path)
    assert "filter_cap.json" in str(err.value)


def test_cc_sbu_align_missing_images(tmp_path):
    write_cc_sbu_align(tmp_path, [(str(i), noise_image(i), f"c{i}") for i in range(8)])
    for i in (3, 5, 6, 7):
        (tmp_path / "image" / f"{i}.jpg").unlink()
    with pytest.raises(FileNotFoundError) as err:
        read_cc_sbu_align(tmp_path)
    msg = str(err.value)
    assert "4 of 8" in msg and "'3'" in msg and "'7'" in msg and "filter_cap.json" in msg
