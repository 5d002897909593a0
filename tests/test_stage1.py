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
