"""Stage-1 data path: ShapesWorld shards -> the same reader as LAION -> cached frozen features."""
import numpy as np
import torch

from minigpt4_min import shapesworld as sw
from minigpt4_min import stage1
from minigpt4_min.data import ShardStats, read_shards


def test_shapesworld_shards_round_trip(tmp_path):
    paths = stage1.write_shapesworld_shards(tmp_path, "val", 30, shard_size=12)
    assert len(paths) == 3
    samples = list(read_shards(paths))
    scenes = sw.split("val", 30)
    assert [s.key for s in samples] == [f"val{i:07d}" for i in range(30)]
    assert [sw.Scene.from_dict(s.meta["scene"]) for s in samples] == scenes
    assert all(s.image.size == (64, 64) and s.image.mode == "RGB" for s in samples)
    # a second call reuses the complete shards instead of rewriting them
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert stage1.write_shapesworld_shards(tmp_path, "val", 30, shard_size=12) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-000000.tar", "val-000001.tar",
                                                          "val-000002.tar", "val-30-64.done"]


def test_shapesworld_shards_one_worker_equals_two(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "val-000007.tar").write_bytes(b"stale shard of an interrupted run")
    one = stage1.write_shapesworld_shards(tmp_path / "one", "val", 25, shard_size=10, workers=1)
    two = stage1.write_shapesworld_shards(tmp_path / "two", "val", 25, shard_size=10, workers=2)
    assert [p.name for p in one] == [p.name for p in two] == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert not (tmp_path / "one" / "val-000007.tar").exists()
    a, b = list(read_shards(one)), list(read_shards(two))
    assert [(s.key, s.meta) for s in a] == [(s.key, s.meta) for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))


def test_encode_shards_caches_and_batches(random_model, tmp_path):
    paths = stage1.write_shapesworld_shards(tmp_path / "shards", "val", 20, shard_size=20)
    stats = ShardStats()
    fs = stage1.encode_shards(random_model, paths, cache_dir=tmp_path / "cache", batch_size=8, stats=stats)
    assert fs.feats.shape == (20, random_model.cfg.num_query_tokens, random_model.cfg.proj_in)
    assert stats.ok == 20 and stats.skipped == 0
    again = stage1.encode_shards(random_model, paths, cache_dir=tmp_path / "cache")
    assert torch.equal(again.feats, fs.feats) and again.scenes == fs.scenes
    get = stage1.caption_batches(fs, batch_size=5)
    a, b = get(7, torch.Generator().manual_seed(7)), get(7, torch.Generator().manual_seed(7))
    assert torch.equal(a["feats"], b["feats"]) and a["answers"] == b["answers"]
    assert all(ans == ans.lower() for ans in a["answers"])


# ---------------------------------------------------------------- real shards (notebook 02's train_shards)
def _img2dataset_shards(folder, n_shards=2, per_shard=4):
    """Shards named as img2dataset names them (00000.tar, ...), KEY.jpg + KEY.json with a
    caption and the url, of non-square 96 x 72 images (a crop then differs from a resize)."""
    from PIL import Image

    from minigpt4_min.data import write_shards

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, paths = {}, []
    for k in range(n_shards):
        batch = []
        for j in range(per_shard):
            key = f"{k:05d}{j:04d}"
            img = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((96, 72), Image.NEAREST)
            images[f"Photo {key}: a thing."] = img
            batch.append((key, img, {"caption": f"Photo {key}: a thing.", "url": f"http://x/{key}.jpg"}))
        (p,) = write_shards(batch, folder / f"tmp{k}", shard_size=per_shard)
        paths.append(p.rename(folder / f"{k:05d}.tar"))
        (folder / f"tmp{k}").rmdir()
    return paths, images


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_shard_list_reads_patterns_folders_and_comma_lists_and_names_what_is_missing(tmp_path):
    import pytest

    paths, _ = _img2dataset_shards(tmp_path / "laion", n_shards=3, per_shard=1)
    want = [str(p) for p in paths]
    d = tmp_path / "laion"
    assert stage1.shard_list(f"{d}/{{00000..00002}}.tar") == want
    assert stage1.shard_list(str(d)) == want                                        # a folder: its *.tar
    assert stage1.shard_list(f"{d}/{{00000..00001}}.tar, {d}/00002.tar") == want    # a comma-separated list
    assert stage1.shard_list(f"{d}/{{00000,00002}}.tar") == [want[0], want[2]]      # a comma inside braces
    assert stage1.shard_list(paths) == want
    with pytest.raises(FileNotFoundError, match=r"train_shards '.*\{00002\.\.00003\}\.tar': 1 shard\(s\) not "
                                                r"found: .*00003\.tar"):
        stage1.shard_list(f"{d}/{{00002..00003}}.tar")
    with pytest.raises(ValueError, match="train_shards=' , ': expected webdataset shards"):
        stage1.shard_list(" , ")


def test_shard_batches_stream_the_shards_through_the_train_transform_and_cache_nothing(random_model, tmp_path):
    import dataclasses

    from minigpt4_min.config import train_config
    from minigpt4_min.data import ImageProcessor, clean_caption
    from minigpt4_min.train import Trainer

    _, images = _img2dataset_shards(tmp_path / "laion")                            # 2 shards of 4
    pattern = str(tmp_path / "laion" / "{00000..00001}.tar")
    crop_cfg = dataclasses.replace(random_model.cfg, train_transform="random_resized_crop")   # the full-scale one
    random_model.cfg = crop_cfg
    before = _files(tmp_path)
    get_batch, urls = stage1.shard_batches(random_model, pattern, batch_size=4, max_txt_len=16, seed=1)
    assert len(urls) == 2
    epoch = [get_batch(s, torch.Generator()) for s in range(2)]                    # 2 workers x 1 shard of 4
    assert all(set(b) == {"images", "answers", "max_txt_len", "end_sym"} for b in epoch)   # images, no feats
    assert sorted(a for b in epoch for a in b["answers"]) == sorted(clean_caption(c) for c in images)
    S = crop_cfg.image_size
    eval_of = {clean_caption(s.caption): ImageProcessor(crop_cfg)(s.image) for s in read_shards(pattern)}  # resize
    for b in epoch:
        assert b["images"].shape == (4, 3, S, S)
        for x, a in zip(b["images"], b["answers"]):
            assert not torch.allclose(x, eval_of[a], atol=1e-3)                   # a random crop, not the resize
    # the transform is the config's: with "resize" (the tiny preset's) the stream gives the resize exactly
    random_model.cfg = dataclasses.replace(crop_cfg, train_transform="resize")
    get_plain, _ = stage1.shard_batches(random_model, pattern, batch_size=4, seed=1, workers=0)
    b = get_plain(0, torch.Generator())
    assert all(torch.allclose(x, eval_of[a], atol=1e-6) for x, a in zip(b["images"], b["answers"]))
    # the trainer runs the frozen encoder inside each step: the projection learns, the encoder does not
    random_model.cfg = crop_cfg
    enc = {k: v.clone() for k, v in random_model.encoder.state_dict().items()}
    proj = random_model.llama_proj.weight.detach().clone()
    tc = train_config(1, "tiny", max_steps=3, batch_size=4, warmup_steps=1, lr=1e-3, min_lr=1e-4)
    history = Trainer(random_model, tc, get_batch).train(progress=False)
    assert len(history) >= 1 and not torch.equal(random_model.llama_proj.weight, proj)
    assert all(torch.equal(v, random_model.encoder.state_dict()[k]) for k, v in enc.items())
    assert _files(tmp_path) == before                                              # no feature cache, nothing written


def test_peek_shards_and_missing_or_unreadable_shards_are_named(random_model, tmp_path):
    import pytest

    from minigpt4_min.data import BadSampleWarning

    paths, images = _img2dataset_shards(tmp_path / "laion", per_shard=3)
    fs = stage1.peek_shards(random_model, paths, n=4)
    assert fs.captions == list(images)[:4] and fs.keys == ["000000000", "000000001", "000000002", "000010000"]
    assert fs.feats.shape == (4, random_model.cfg.num_query_tokens, random_model.cfg.proj_in)
    with pytest.raises(FileNotFoundError, match=r"00007\.tar"):
        stage1.shard_batches(random_model, f"{paths[0]},{tmp_path / 'laion' / '00007.tar'}", batch_size=2)
    import webdataset as wds

    bad = tmp_path / "bad" / "00000.tar"
    bad.parent.mkdir()
    with wds.TarWriter(str(bad), encoder=False) as tw:
        tw.write({"__key__": "k", "jpg": b"not a jpeg"})
    with pytest.warns(BadSampleWarning), pytest.raises(ValueError, match=rf"from {bad}: no readable sample"):
        stage1.peek_shards(random_model, [bad])
