"""Multi-process training (distributed.py, `python -m minigpt4_min train`): 2 gloo ranks on
the CPU compute what 1 process computes with the same global batch, only llama_proj's
gradients are all-reduced, the shard stream reads every sample once per epoch across ranks
and loader workers, rank 0 alone writes checkpoints and a resumed 2-rank run continues
exactly; the README's torchrun commands run (tiny) or give the paper's plan (full scale)."""
import json
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from minigpt4_min import distributed as D
from minigpt4_min import stage1
from minigpt4_min.__main__ import main
from minigpt4_min.config import get_config
from minigpt4_min.data import ImageProcessor, write_shards

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


# ---------------------------------------------------------------- a 2-rank run, spawned
def _rank(rank: int, world: int, port: int, runs: list[list[str]], rec: str) -> None:
    """One gloo rank: record every file the trainer writes and each run's final projection,
    then run the command lines `runs` (the CLI's own code) in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import minigpt4_min.train as T

    real_save, real_train = T.save_file, D.DistributedTrainer.train

    def save_file_recorded(tensors, path, *a, **k):
        with open(Path(rec) / f"writes-rank{rank}.txt", "a") as f:
            f.write(f"{path}\n")
        return real_save(tensors, path, *a, **k)

    def train_recorded(self, *a, **k):
        history = real_train(self, *a, **k)
        frozen = [p for n, p in self.model.named_parameters() if not n.startswith("llama_proj.")]
        torch.save({"proj": {n: p.detach().clone() for n, p in self.params},
                    "frozen_grads": sum(p.grad is not None for p in frozen),
                    "reduced": self.model.reduced_parameters()},
                   Path(rec) / f"rank{rank}-run{len(list(Path(rec).glob(f'rank{rank}-run*')))}.pt")
        return history

    T.save_file, D.DistributedTrainer.train = save_file_recorded, train_recorded
    with D.process_group("gloo"):
        for argv in runs:
            if main(argv) != 0:
                raise SystemExit(f"rank {rank}: {argv} failed")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A feature cache of 48 ShapesWorld images (shipped tiny encoder), and a fixed initial projection."""
    from minigpt4_min.model import MiniGPT4

    root = tmp_path_factory.mktemp("features")
    model = MiniGPT4.from_config(get_config("tiny"))
    paths = stage1.write_shapesworld_shards(root / "shards", "val", 48, shard_size=12, workers=1)
    stage1.encode_shards(model, paths, cache_dir=root / "cache")
    torch.manual_seed(7)
    model.llama_proj.reset_parameters()
    model.save_projection(root / "init.safetensors")
    return next((root / "cache").glob("features-*")), root / "init.safetensors"


def test_two_gloo_ranks_equal_one_process_and_resume_exactly(features, tmp_path, no_torchrun_env):
    feats, init = features
    common = ["train", "--stage", "1", "--features", str(feats), "--projection", str(init),
              "--steps", "4", "--lr", "1e-3", "--ckpt-every", "2", "--log-every", "1"]
    # 1 process, global batch 8
    assert main(common + ["--batch", "8", "--out", str(tmp_path / "one")]) == 0
    # 2 ranks x 4; a fresh 2-rank run resumed from the step-2 checkpoint; 2 ranks x 2 x 2 micro-batches
    two, resumed, accum = tmp_path / "two", tmp_path / "resumed", tmp_path / "accum"
    runs = [common + ["--batch", "4", "--out", str(two)],
            common + ["--batch", "4", "--out", str(resumed), "--resume", str(two / "step_000002")],
            common + ["--batch", "2", "--accum-steps", "2", "--out", str(accum)]]
    mp.spawn(_rank, args=(2, free_port(), runs, str(tmp_path)), nprocs=2, join=True)

    one_w, two_w = load_file(str(tmp_path / "one/last/model.safetensors")), load_file(str(two / "last/model.safetensors"))
    start = load_file(str(init))
    diff = max((one_w[k] - two_w[k]).abs().max().item() for k in one_w)
    moved = min((one_w[k] - start[k]).abs().max().item() for k in one_w)
    print(f"2 ranks vs 1 process: max abs diff {diff:.3g} (the projection moved {moved:.3g})")
    assert diff <= 1e-6 and moved > 1e-3
    # (2 ranks x 2 micro-batches of 2 draw other rows than 1 x 8: the micro-batch seeds differ, so
    # its projection is compared with 1 process accumulating the same micro-batches: 1 x 4 x 2)
    assert main(common + ["--batch", "4", "--accum-steps", "2", "--out", str(tmp_path / "one_accum")]) == 0
    acc_w = load_file(str(accum / "last/model.safetensors"))
    one_acc = load_file(str(tmp_path / "one_accum/last/model.safetensors"))
    diff_acc = max((one_acc[k] - acc_w[k]).abs().max().item() for k in one_acc)
    print(f"2 ranks x 2 micro-batches vs 1 process x 2 micro-batches: max abs diff {diff_acc:.3g}")
    assert diff_acc <= 1e-6
    # the loss each run logs is the global batch's
    h1 = json.loads((tmp_path / "one/last/trainer_state.json").read_text())["history"]
    h2 = json.loads((two / "last/trainer_state.json").read_text())["history"]
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(h1, h2)) <= 1e-5

    # every rank ends with the same projection; no frozen tensor got a gradient; DDP reduced llama_proj only
    for run in (0, 1, 2):
        r0, r1 = (torch.load(tmp_path / f"rank{r}-run{run}.pt") for r in (0, 1))
        assert all(torch.equal(r0["proj"][k], r1["proj"][k]) for k in r0["proj"])
        assert r0["frozen_grads"] == r1["frozen_grads"] == 0
        assert r0["reduced"] == ["llama_proj.weight", "llama_proj.bias"]

    # rank 0 alone wrote the checkpoints
    assert not (tmp_path / "writes-rank1.txt").exists()
    written = sorted(Path(p).relative_to(tmp_path).as_posix()
                     for p in (tmp_path / "writes-rank0.txt").read_text().split())
    assert written == sorted(f"{d}/{f}.safetensors" for d in ("two/step_000002", "two/step_000004", "two/last",
                                                              "resumed/step_000004", "resumed/last",
                                                              "accum/step_000002", "accum/step_000004", "accum/last")
                             for f in ("model", "optimizer"))
    # the resumed run continues exactly
    res_w = load_file(str(resumed / "last/model.safetensors"))
    assert all(torch.equal(res_w[k], two_w[k]) for k in two_w)
    h3 = json.loads((resumed / "last/trainer_state.json").read_text())["history"]
    assert [(h["step"], h["loss"]) for h in h3] == [(h["step"], h["loss"]) for h in h2]


# ---------------------------------------------------------------- only llama_proj is reduced
def test_ddp_all_reduces_only_the_projection(random_model, no_torchrun_env):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        d = D.init()                                       # joins the existing group
        assert (d.rank, d.world_size, d.owner, d.grouped) == (0, 1, False, True)
        net = D.DistributedProjection(random_model, d)
        assert net.reduced_parameters() == ["llama_proj.weight", "llama_proj.bias"]
        frozen = {f"model.{n}" for n, p in random_model.named_parameters() if not n.startswith("llama_proj.")}
        assert frozen and frozen <= net.ddp.parameters_to_ignore
        g = torch.Generator().manual_seed(0)
        batch = {"feats": torch.randn(3, random_model.cfg.num_query_tokens, random_model.cfg.proj_in, generator=g),
                 "answers": ["a red circle", "two squares on the left", "blue"], "max_txt_len": 32}
        loss = net.loss(batch)
        loss.backward()
        assert abs(loss.item() - random_model.loss(batch).item()) <= 1e-6   # one rank: the plain mean
        assert all(p.grad is not None for _, p in random_model.trainable_parameters())
        assert all(p.grad is None for n, p in random_model.named_parameters() if not n.startswith("llama_proj."))
    finally:
        dist.destroy_process_group()


def test_without_torchrun_there_is_one_process_and_no_group(no_torchrun_env):
    d = D.init()
    assert (d.rank, d.world_size, d.grouped, d.owner) == (0, 1, False, False)


def test_bad_torchrun_environment_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        D.init()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 with WORLD_SIZE=2"):
        D.init()


# ---------------------------------------------------------------- the same global batch
def test_rank_slices_make_up_the_global_batch():
    fs = stage1.FeatureSet(torch.arange(20.0).view(10, 1, 2), [f"cap {i}" for i in range(10)], [None] * 10,
                           [str(i) for i in range(10)])
    whole = stage1.caption_batches(fs, 6)
    parts = [D.rank_slice(whole, D.Dist(rank=r, world_size=3), 2)(5, torch.Generator().manual_seed(5))
             for r in range(3)]
    full = whole(5, torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([p["feats"] for p in parts]), full["feats"])
    assert sum((p["answers"] for p in parts), []) == full["answers"]
    assert all(p["max_txt_len"] == 32 and p["end_sym"] == "\n" for p in parts)
    with pytest.raises(ValueError, match="'feats' has 6 rows; expected .* 4 per rank x 3 ranks = 12"):
        D.rank_slice(whole, D.Dist(rank=0, world_size=3), 4)(5, torch.Generator())


# ---------------------------------------------------------------- the shard stream
def _captions(stream: D.ShardStream, workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [caption for _, caption in loader]


def test_shard_stream_reads_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path, monkeypatch):
    write_shards([(f"{i:05d}", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy(), {"caption": f"Caption {i}."})
                  for i in range(24)], tmp_path, shard_size=3)                     # 8 shards of 3
    everything = sorted(f"caption {i}" for i in range(24))
    proc = ImageProcessor(get_config("tiny"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_epoch = []
    for epoch in (0, 1):
        seen = {}
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))                   # webdataset reads the rank here
            stream = D.ShardStream(tmp_path, proc, seed=3)
            stream.epoch = epoch
            seen[rank] = _captions(stream, workers=2)
        assert len(seen[0]) == len(seen[1]) == 12                    # 2 ranks x 2 workers x 2 shards x 3
        assert sorted(seen[0] + seen[1]) == everything               # each sample once, none missed
        per_epoch.append(set(seen[0]))
    assert per_epoch[0] != per_epoch[1]                              # shards are reshuffled per epoch

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(ValueError, match=r"8 shard\(s\) cannot feed 5 rank\(s\) x 2 loader worker\(s\)"):
        _captions(D.ShardStream(tmp_path, proc), workers=2)


def test_stream_batches_run_into_the_next_epoch(tmp_path, no_torchrun_env):
    write_shards([(f"{i:05d}", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy(), {"caption": f"c {i}"})
                  for i in range(6)], tmp_path, shard_size=3)
    stream = D.ShardStream(tmp_path, ImageProcessor(get_config("tiny")), seed=0)
    get = D.stream_batches(stream, batch_size=2, workers=0)
    batches = [get(s, torch.Generator()) for s in range(5)]                      # 3 batches an epoch
    assert [b["images"].shape for b in batches] == [torch.Size([2, 3, 64, 64])] * 5
    assert sorted(sum((b["answers"] for b in batches[:3]), [])) == [f"c {i}" for i in range(6)]
    assert stream.epoch == 1
    with pytest.raises(ValueError, match="fewer than 7 samples per loader worker"):
        D.stream_batches(stream, batch_size=7, workers=0)(0, torch.Generator())


# ---------------------------------------------------------------- the command line
def test_train_command_refuses_bad_arguments(tmp_path, capsys, no_torchrun_env):
    assert main(["train", "--stage", "2", "--features", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "stage 2 trains on --align-dir" in capsys.readouterr().err
    assert main(["train", "--stage", "1", "--features", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert f"--features {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert main(["train", "--stage", "1", "--features", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "not a feature cache of encode_shards (no feats.safetensors / meta.json)" in capsys.readouterr().err
    assert main(["train", "--stage", "1", "--features", str(tmp_path), "--out", str(tmp_path),
                 "--lr", "1e-3", "--min-lr", "1e-2"]) == 2
    assert "expected 0 < min lr <= lr, got min lr 0.01 and lr 0.001" in capsys.readouterr().err


def test_stage2_command_trains_on_an_align_folder(tmp_path, no_torchrun_env):
    from minigpt4_min import shapesworld as sw
    from minigpt4_min.data import write_cc_sbu_align

    scenes = sw.split("val", 6)
    write_cc_sbu_align(tmp_path / "align", [(str(i), sw.render(s, 64), sw.describe(s)) for i, s in enumerate(scenes)])
    assert main(["train", "--stage", "2", "--align-dir", str(tmp_path / "align"), "--steps", "2",
                 "--batch", "3", "--log-every", "1", "--out", str(tmp_path / "s2")]) == 0
    state = json.loads((tmp_path / "s2/last/trainer_state.json").read_text())
    assert state["step"] == 2 and state["config"]["batch_size"] == 3 and len(state["history"]) == 2


# ---------------------------------------------------------------- the README's commands
def _readme_commands() -> list[str]:
    """The shell commands of the README's torchrun section (backslash continuations joined)."""
    text = (REPO / "README.md").read_text()
    section = re.split(r"\n##+ ", text.split("### Multi-GPU training with torchrun", 1)[1], maxsplit=1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [c.strip() for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_paper_stage1_command_gives_the_papers_plan(capsys, monkeypatch):
    paper = [c for c in _readme_commands() if c.startswith("torchrun ")]
    assert len(paper) == 1
    words = shlex.split(paper[0])
    monkeypatch.setenv("WORLD_SIZE", words[words.index("--nproc_per_node") + 1])
    assert main(words[words.index("minigpt4_min") + 1:] + ["--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {k: plan[k] for k in ("stage", "scale", "world_size", "batch_per_rank", "global_batch", "steps",
                                 "warmup_steps", "lr", "min_lr", "warmup_lr", "weight_decay", "ckpt_every")} == {
        "stage": 1, "scale": "vicuna13b", "world_size": 4, "batch_per_rank": 64, "global_batch": 256,
        "steps": 20000, "warmup_steps": 5000, "lr": 1e-4, "min_lr": 8e-5, "warmup_lr": 1e-6,
        "weight_decay": 0.05, "ckpt_every": 5000}


def test_readme_tiny_torchrun_commands_run(tmp_path, monkeypatch):
    tiny = [c for c in _readme_commands() if c.startswith(".venv/bin/")]
    assert len(tiny) == 2 and "--nproc_per_node 2" in tiny[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    shards = shlex.split(tiny[0])
    assert shards[:3] == [".venv/bin/python", "-m", "minigpt4_min"]
    monkeypatch.chdir(tmp_path)
    assert main(shards[3:]) == 0                                     # the same argv, in this process
    words = shlex.split(tiny[1])
    words[0] = str(REPO / words[0])                                  # .venv/bin/torchrun of this checkout
    r = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    state = json.loads((tmp_path / "runs/ddp/stage1/last/trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["history"]) >= 1
    assert "global batch 8 per rank x 2 = 16" in out and out.count("global batch") == 1   # rank 0 speaks
