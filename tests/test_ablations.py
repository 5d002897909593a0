"""The ablations of notebook 06: each projector variant trains exactly what it should (and the
paper's one linear layer stays the default), the caption-content knob, the verdict rule,
held-out test images, the cache, and the same numbers for the same seed however many workers."""
import dataclasses
import json
import random

import pytest
import torch
from torch import nn

from minigpt4_min import ablations as ab
from minigpt4_min import projectors
from minigpt4_min import shapesworld as sw
from minigpt4_min import verdicts as vd
from minigpt4_min.config import get_config
from minigpt4_min.data import write_cc_sbu_align
from minigpt4_min.evaluate import _values
from minigpt4_min.model import MiniGPT4


def variant(m: MiniGPT4, kind: str) -> MiniGPT4:
    return MiniGPT4(dataclasses.replace(m.cfg, projector=kind), m.encoder, m.llm, m.tokenizer)


def test_the_default_is_the_papers_one_linear_layer():
    assert get_config("tiny").projector == "linear"
    assert all(get_config(n).projector == "linear" for n in ("vicuna7b", "vicuna13b", "llama2-7b"))
    with pytest.raises(ValueError, match="unknown projector 'mlp9'"):
        projectors.check_kind("mlp9")


@pytest.mark.parametrize("kind", projectors.KINDS)
def test_what_trains_per_variant(random_model, kind):
    m = variant(random_model, kind)
    d, hq = m.llm.config.hidden_size, m.cfg.qformer["hidden_size"]
    named = dict(m.trainable_parameters())
    assert all(n.startswith("llama_proj.") for n in named)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(named)   # nothing frozen trains
    n = sum(p.numel() for p in named.values())
    last = sum(p.numel() for p in m.encoder.qformer.encoder.layer[-1].parameters())
    expected = {"linear": hq * d + d, "mlp2": hq * d + d + d * d + d, "mlp3": hq * d + d + 2 * (d * d + d),
                "no_qformer": 4 * m.cfg.vision_width * d + d, "finetune_qformer": last + hq * d + d}[kind]
    assert n == expected
    assert isinstance(m.llama_proj, nn.Linear) == (kind in ("linear", "no_qformer"))
    # one step moves every trainable tensor and leaves the frozen ones alone
    img = torch.rand(2, 3, m.cfg.image_size, m.cfg.image_size)
    frozen = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    before = {k: v.detach().clone() for k, v in named.items()}
    m.train_mode()
    m.loss({"feats": m.image_features(img), "answers": ["a red circle", "two shapes"]}).backward()
    opt = torch.optim.SGD(named.values(), lr=0.1)
    opt.step()
    assert all(not torch.equal(before[k], p.detach()) for k, p in named.items())
    assert all(torch.equal(frozen[k], v) for k, v in m.encoder.state_dict().items())


def test_variant_features(random_model):
    img = torch.rand(3, 3, 64, 64)
    base = random_model
    vit = base.encoder.vit(img)                                                     # (3, 1 + 64, 128)
    patches = variant(base, "no_qformer")
    f = patches.encoder.read_out(vit, projector="no_qformer")
    assert f.shape == (3, 16, 4 * 128) and patches.cfg.num_image_tokens == 16 and patches.cfg.proj_in == 512
    assert torch.equal(f[:, 1, 128:256], vit[:, 1 + 5])                              # patch 5 = group 1, slot 1
    # finetune_qformer: the trainable copy of the last layer, on its cached input, gives the
    # frozen Q-Former's output exactly; a step of training changes the copy, not the encoder
    ft = variant(base, "finetune_qformer")
    ft.eval()
    x = base.encoder.read_out(vit, projector="finetune_qformer")                     # (3, 24, 128)
    with torch.no_grad():
        h = ft.llama_proj.layer(x, None, None, query_length=x.shape[1])
    assert torch.allclose(h, base.encoder.read_out(vit), atol=1e-6)
    assert ft.llama_proj.layer is not base.encoder.qformer.encoder.layer[-1]


def test_only_the_linear_projection_has_the_released_format(random_model, tmp_path):
    m = variant(random_model, "mlp2")
    with pytest.raises(ValueError, match="only the paper's linear llama_proj"):
        m.export_projection(tmp_path / "x.pth")
    m.save_projection(tmp_path / "mlp2.safetensors")
    other = variant(random_model, "mlp2")
    other.load_projection(tmp_path / "mlp2.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(m.llama_proj.parameters(), other.llama_proj.parameters()))


def test_position_share_of_the_captions():
    scenes = sw.split("train", 600)
    for share, lo, hi in ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.5, 0.42, 0.58), (None, 0.15, 0.30)):
        got = ab.share_naming_position(ab.stage1_captions(scenes, share))
        assert lo <= got <= hi, (share, got)
    # None draws exactly what notebook 02's shards hold (the shipped captions)
    s = scenes[7]
    assert ab.stage1_captions([s], None) == [sw.caption(s, random.Random(s.seed))]
    assert not _values("two shapes on red background", "position")


def test_verdict_rule():
    assert vd.verdict([0.6, 0.62, 0.61], [0.5, 0.52, 0.51]) == "holds"
    assert vd.verdict([0.5, 0.52, 0.51], [0.6, 0.62, 0.61]) == "does not hold"
    assert vd.verdict([0.6, 0.4, 0.5], [0.55, 0.45, 0.5]) == "not resolved by the spread"
    assert vd.verdict([0.9], [0.1]).startswith("not resolved (one seed")
    # the spread is std + std: a difference of 0.2 is not enough against 0.28, but is against 0.14
    assert vd.verdict([0.5, 0.7], [0.3, 0.5]) == "not resolved by the spread"
    assert vd.verdict([0.55, 0.65], [0.35, 0.45]) == "holds"


def test_cells_share_the_baseline():
    cs = ab.cells(seeds=[0, 1, 2])
    assert len(cs) == 11 * 3 and len(set(cs)) == len(cs)
    assert sum(c.setting() == ab.Cell() for c in cs) == 3


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A cc_sbu_align folder of 16 stage-2 scenes and a run folder prepared at CI budget."""
    root = tmp_path_factory.mktemp("abl")
    scenes = sw.split("stage2", 16)
    write_cc_sbu_align(root / "align", ((f"sw{i:05d}", sw.render(s), sw.describe(s)) for i, s in enumerate(scenes)))
    budget = dataclasses.replace(ab.BUDGETS["ci"], n_train=64, n_eval=6, n_vqa=3, stage1_steps=4, stage2_steps=2)
    ab.prepare(root / "run", budget, root / "align")
    return root, budget


def test_held_out_test_images_and_features(small_run):
    root, budget = small_run
    bench = ab.Workbench(ab.features_dir(root / "run", budget), budget)
    test = {json.dumps(s.to_dict(), sort_keys=True) for s in bench.test_scenes}
    train = {json.dumps(s.to_dict(), sort_keys=True) for s in sw.split("train", 4000)}
    align = {json.dumps(s.to_dict(), sort_keys=True) for s in sw.split("stage2", 16)}
    assert not test & train and not test & align
    assert bench.feats["train"]["queries"].shape == (64, 24, 128)
    assert bench.feats["test"]["patches"].shape == (6, 16, 512)
    d_llm = get_config("tiny").llm["hidden_size"]
    assert [r["params"] for r in ab.what_trains(bench)][0] == 128 * d_llm + d_llm     # Linear(128, d_llm)


def test_same_seed_same_numbers_with_any_number_of_workers_and_a_cache(small_run, monkeypatch):
    root, budget = small_run
    cells = [ab.Cell(seed=0), ab.Cell("mlp2", seed=1)]
    for name in ("w1", "w2"):
        (root / name / "ablations").mkdir(parents=True)
        (root / name / "ablations" / ab.features_dir(root, budget).name).symlink_to(ab.features_dir(root / "run", budget))
    r1 = ab.run(cells, root / "w1", budget, workers=1)
    r2 = ab.run(cells, root / "w2", budget, workers=2)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rs]
    assert strip(r1) == strip(r2)
    assert r1[0]["stage1/loss_last"] != r1[1]["stage1/loss_last"]
    # a second call reads the cache: nothing runs
    monkeypatch.setattr(ab.Workbench, "run", lambda self, cell: pytest.fail("a cached cell ran again"))
    assert strip(ab.run(cells, root / "w1", budget, workers=1)) == strip(r1)


def test_run_needs_prepared_features(tmp_path):
    with pytest.raises(FileNotFoundError, match="ablations.prepare"):
        ab.run([ab.Cell()], tmp_path, ab.BUDGETS["ci"])


def test_another_curated_set_is_encoded_again_and_cached_apart(small_run, tmp_path):
    root, budget = small_run
    run = tmp_path / "run"
    ab.prepare(run, budget, root / "align")
    first = ab.cells_dir(run, budget)
    scenes = sw.split("stage2", 5)
    write_cc_sbu_align(tmp_path / "other", ((f"sw{i:05d}", sw.render(s), sw.describe(s)) for i, s in enumerate(scenes)))
    ab.prepare(run, budget, tmp_path / "other")
    meta = json.loads((ab.features_dir(run, budget) / "align.json").read_text())
    assert len(meta["ids"]) == 5 and meta["source"] == str((tmp_path / "other").resolve())
    assert ab.cells_dir(run, budget) != first
