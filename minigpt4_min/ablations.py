"""The paper's ablations in miniature (notebook 06): is ONE linear layer enough, how much
stage-1 data it needs, and what the captions decide (paper §3 and its architecture ablation).

Three experiments, each a set of *cells* trained at one fixed budget (`Budget`): stage 1 on
ShapesWorld image-caption pairs, then stage 2 on notebook 03's curated set, both measured on
held-out test images after each stage.

    architecture   the projector (projectors.py): linear / mlp2 / mlp3 / no_qformer / finetune_qformer
    data           the share of the stage-1 pairs used (10 / 30 / 50 / 100 %), same steps
    captions       the share of stage-1 captions that name a position (none / shipped / half / all)

Every cell runs for several seeds (the projector's initialisation, the batches, the data
subset); tables give mean ± std, and a claim's verdict is resolved only when the difference of
the means is larger than the sum of the two seed spreads (`verdicts.py`). The image features of
every projector kind are computed once by the frozen encoder (`prepare`); each finished cell is
a JSON file under `run_dir/ablations/`, so a re-run skips it. Cells run in `workers` processes
of one thread each: on 2 cores two single-threaded trainings do about 1.6x the work of one
two-threaded training (the tiny model's matrices are too small to split well), and a cell's
numbers do not depend on how many workers there are.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import shapesworld as sw
from . import stage1, stage2
from .config import VICUNA_TEMPLATE, get_config, train_config
from .data import ImageProcessor, load_image, read_cc_sbu_align
from .encoder import VisualEncoder
from .evaluate import evaluate_model
from .llm import load_llm
from .model import MiniGPT4
from .projectors import KINDS
from .train import Trainer

# which frozen features each projector reads (encoder.read_out)
FEATURES = {"linear": "queries", "mlp2": "queries", "mlp3": "queries", "no_qformer": "patches",
            "finetune_qformer": "before_last"}
READ_OUT = {"queries": "linear", "patches": "no_qformer", "before_last": "finetune_qformer"}
METRICS = ("vqa_accuracy", "vqa_colour", "vqa_position", "vqa_count", "detailed/object_recall",
           "detailed/attribute_accuracy", "detailed/chair_i", "detailed/failure_rate")


@dataclass(frozen=True)
class Budget:
    """What every cell gets: the same steps, batches and evaluation, whatever it ablates.

    The default is sized for 33 cells (11 settings x 3 seeds) in about 10 minutes on 2 cores, so
    stage 1 sees 2,560 pairs (notebook 02: 76,800): the verdicts are about this budget, where how
    fast a variant learns counts as much as what it could learn. Measured at the tiny scale, one
    linear layer, stage-2 VQA: 60 / 120 / 300 stage-1 steps of 32 gave 0.35-0.38 / 0.39-0.42 /
    0.45 (2 / 2 / 1 seeds); a run of all 33 cells at 100 steps (stage 2: 20 steps, 80 test images)
    gave the same verdicts as this default and took 686 s of cells, 41 s of one core each."""
    n_train: int = 4000          # stage-1 pairs (ShapesWorld train scenes); a data fraction takes a share
    stage1_steps: int = 80
    stage1_batch: int = 32
    stage1_lr: float = 3e-2      # warmup 10 %, then cosine to lr / 10
    stage2_steps: int = 16       # on notebook 03's curated set (notebook 04: 68 steps of 16)
    stage2_batch: int = 16
    stage2_lr: float = 1e-3
    n_eval: int = 64             # held-out test images, one detailed description each
    n_vqa: int = 50              # of which this many get the VQA questions
    max_new_tokens: int = 72

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def schedule(self, stage: int, seed: int):
        """The stage's tiny preset at this budget: warmup 10 % of the steps, cosine to lr / 10."""
        steps, batch, lr = ((self.stage1_steps, self.stage1_batch, self.stage1_lr) if stage == 1
                            else (self.stage2_steps, self.stage2_batch, self.stage2_lr))
        return train_config(stage, "tiny", max_steps=steps, batch_size=batch, lr=lr, min_lr=lr / 10,
                            warmup_steps=max(1, steps // 10), seed=seed)


BUDGETS = {"default": Budget(),
           "ci": Budget(n_train=400, stage1_steps=12, stage1_batch=16, stage2_steps=4, stage2_batch=8,
                        n_eval=12, n_vqa=6, max_new_tokens=32)}


@dataclass(frozen=True)
class Cell:
    """One configuration of one experiment, for one seed."""
    projector: str = "linear"
    data_fraction: float = 1.0
    position_share: float | None = None     # None: the shipped captions (2 of 9 templates)
    seed: int = 0

    def key(self) -> str:
        p = "shipped" if self.position_share is None else f"{self.position_share:g}"
        return f"{self.projector}-data{self.data_fraction:g}-pos{p}-seed{self.seed}"

    def setting(self) -> "Cell":
        """The cell without its seed: what the seeds are grouped by."""
        return dataclasses.replace(self, seed=0)


EXPERIMENTS = {
    "architecture": [Cell(projector=k) for k in KINDS],
    "data": [Cell(data_fraction=f) for f in (0.1, 0.3, 0.5, 1.0)],
    "captions": [Cell(position_share=p) for p in (0.0, None, 0.5, 1.0)],
}


def cells(experiments=tuple(EXPERIMENTS), seeds=(0, 1, 2)) -> list[Cell]:
    """Every (setting, seed) of the experiments, each once (the baseline is shared by all three)."""
    out = []
    for e in experiments:
        out += [dataclasses.replace(c, seed=s) for c in EXPERIMENTS[e] for s in seeds]
    return list(dict.fromkeys(out))


def stage1_captions(scenes: list[sw.Scene], position_share: float | None) -> list[str]:
    """One caption per scene, from the scene's own seed (None: exactly notebook 02's shards)."""
    return [sw.caption(s, random.Random(s.seed), position_share) for s in scenes]


# ---------------------------------------------------------------- frozen features, once
def features_dir(run_dir: str | Path, budget: Budget) -> Path:
    return Path(run_dir) / "ablations" / f"features-{budget.n_train}-{budget.n_eval}"


@torch.no_grad()
def encode_all(encoder: VisualEncoder, images: list, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """Images -> {feature kind: (N, tokens, width)}: one ViT pass, every read-out of it."""
    proc = ImageProcessor(encoder.cfg, train=False)
    parts = {k: [] for k in READ_OUT}
    for i in range(0, len(images), batch_size):
        vit = encoder.vit(proc.batch(images[i:i + batch_size]))                  # (B, 1+P, Wv)
        for k, projector in READ_OUT.items():
            parts[k].append(encoder.read_out(vit, projector=projector).float())
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


def prepare(run_dir: str | Path, budget: Budget, align_dir: str | Path) -> Path:
    """Encode the stage-1 pairs, the curated stage-2 set and the test images once, for every
    projector kind; returns the folder (reused when it is complete)."""
    folder = features_dir(run_dir, budget)
    done = folder / "done.json"
    source = str(Path(align_dir).resolve())
    if done.exists() and json.loads((folder / "align.json").read_text())["source"] == source:
        return folder
    done.unlink(missing_ok=True)                                  # another curated set: encode again
    items = read_cc_sbu_align(align_dir)
    if not items:
        raise ValueError(f"{align_dir}/filter_cap.json has no annotations: run notebook 03 first")
    cfg = get_config("tiny")
    encoder = VisualEncoder.load(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {"train": sw.split("train", budget.n_train), "test": sw.split("test", budget.n_eval)}
    for name, scenes in tqdm(sets.items(), desc="encode (frozen)"):
        save_file(encode_all(encoder, [sw.render(s, cfg.image_size) for s in scenes]), str(folder / f"{name}.safetensors"))
    save_file(encode_all(encoder, [load_image(p) for _, p, _ in items]), str(folder / "align.safetensors"))
    (folder / "align.json").write_text(json.dumps({"ids": [i for i, _, _ in items], "captions": [c for *_, c in items],
                                                    "source": source}))
    (folder / "done.json").write_text(json.dumps(asdict(budget)))
    return folder


# ---------------------------------------------------------------- one cell
class Workbench:
    """The frozen parts and the cached features, loaded once per process."""

    def __init__(self, folder: str | Path, budget: Budget):
        folder = Path(folder)
        self.budget, self.cfg = budget, get_config("tiny")
        self.llm, self.tok = load_llm(self.cfg.llm_path, self.cfg.llm_dtype)
        self.encoder = VisualEncoder.load(self.cfg)
        self.feats = {n: load_file(str(folder / f"{n}.safetensors")) for n in ("train", "test", "align")}
        self.align = json.loads((folder / "align.json").read_text())
        self.train_scenes = sw.split("train", budget.n_train)
        self.test_scenes = sw.split("test", budget.n_eval)
        # notebook 03 names its images sw{index of the "stage2" split}: their ground truth
        self.align_scenes = [sw.scene_at("stage2", int(i[2:])) if re.fullmatch(r"sw\d+", i) else None
                             for i in self.align["ids"]]

    def model(self, projector: str) -> MiniGPT4:
        """A fresh projector of `projector` kind on the shared frozen parts (torch's RNG inits it)."""
        return MiniGPT4(dataclasses.replace(self.cfg, projector=projector), self.encoder, self.llm, self.tok)

    def feature_set(self, split: str, projector: str, idx=None, captions=None) -> stage1.FeatureSet:
        f = self.feats[split][FEATURES[projector]]
        scenes = {"train": self.train_scenes, "test": self.test_scenes}.get(split) or [None] * len(f)
        idx = list(range(len(f))) if idx is None else list(idx)
        caps = captions if captions is not None else (self.align["captions"] if split == "align" else [""] * len(f))
        return stage1.FeatureSet(f[idx], [caps[i] for i in idx], [scenes[i] for i in idx], [f"{split}{i}" for i in idx])

    def evaluate(self, model: MiniGPT4, test: stage1.FeatureSet) -> dict[str, float]:
        b = self.budget
        m, _ = evaluate_model(model, test, {"detailed": stage2.EVAL_PROMPTS["detailed"]}, n_vqa=b.n_vqa,
                              max_new_tokens=b.max_new_tokens)
        return {k: m[k] for k in METRICS}

    def run(self, cell: Cell) -> dict:
        """Stage 1, then stage 2, of one cell; metrics after each on the test images."""
        b, clock = self.budget, Clock()
        torch.manual_seed(cell.seed)
        model = self.model(cell.projector)
        n = len(self.train_scenes)
        k = max(1, round(cell.data_fraction * n))
        idx = sorted(random.Random(cell.seed).sample(range(n), k)) if k < n else range(n)
        captions = stage1_captions(self.train_scenes, cell.position_share)
        train = self.feature_set("train", cell.projector, idx, captions)
        test = self.feature_set("test", cell.projector)
        h1 = Trainer(model, b.schedule(1, cell.seed), stage1.caption_batches(train, b.stage1_batch, self.cfg.max_txt_len_stage1)).train(progress=False)
        clock("stage1")
        m1 = self.evaluate(model, test)
        clock("eval")
        align = self.feature_set("align", cell.projector)
        h2 = Trainer(model, b.schedule(2, cell.seed), stage2.instruction_batches(align, b.stage2_batch, self.cfg.max_txt_len_stage2,
                                                             VICUNA_TEMPLATE)).train(progress=False)
        clock("stage2")
        m2 = self.evaluate(model, test)
        clock("eval")
        return {"cell": asdict(cell), "trainable_params": sum(p.numel() for _, p in model.trainable_parameters()),
                "n_pairs": len(train), "position_captions": share_naming_position([captions[i] for i in idx]),
                **{f"stage1/{k}": v for k, v in m1.items()}, **{f"stage2/{k}": v for k, v in m2.items()},
                "stage1/loss_last": h1[-1]["loss"], "stage2/loss_last": h2[-1]["loss"],
                **{f"seconds/{k}": v for k, v in clock.spent.items()}, "seconds": sum(clock.spent.values())}


class Clock:
    """Seconds spent per phase: `clock("name")` adds the time since the last call to that phase."""

    def __init__(self):
        self.last, self.spent = time.perf_counter(), {}

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.spent[phase] = self.spent.get(phase, 0.0) + now - self.last
        self.last = now


def share_naming_position(captions: list[str]) -> float:
    """The share of captions that name where an object is ("on the left", "the top", ...)."""
    from .evaluate import _values
    return sum(bool(_values(c, "position")) for c in captions) / max(len(captions), 1)


# ---------------------------------------------------------------- many cells, cached, in parallel
_BENCH: Workbench | None = None


def _init_worker(folder: str, budget: Budget) -> None:
    global _BENCH
    torch.set_num_threads(1)
    _BENCH = Workbench(folder, budget)


def _run_in_worker(cell: Cell) -> dict:
    return _BENCH.run(cell)


def cells_dir(run_dir: str | Path, budget: Budget) -> Path:
    """Where the cells of this budget on the prepared curated set are cached."""
    source = json.loads((features_dir(run_dir, budget) / "align.json").read_text())["source"]
    return Path(run_dir) / "ablations" / f"cells-{budget.key()}-{hashlib.sha256(source.encode()).hexdigest()[:6]}"


def run(todo_cells: list[Cell], run_dir: str | Path, budget: Budget, workers: int = 2) -> list[dict]:
    """Results of `todo_cells` (in that order): finished cells are read from
    `cells_dir(run_dir, budget)`, the others run, `workers` at a time, one thread each."""
    feats = features_dir(run_dir, budget)
    if not (feats / "done.json").exists():
        raise FileNotFoundError(f"{feats} is not complete: call ablations.prepare(run_dir, budget, align_dir) first")
    folder = cells_dir(run_dir, budget)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [c for c in todo_cells if not (folder / f"{c.key()}.json").exists()]

    def save(cell: Cell, result: dict) -> None:
        tmp = folder / f"{cell.key()}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(folder / f"{cell.key()}.json")

    bar = tqdm(total=len(todo), desc=f"ablation cells ({len(todo_cells) - len(todo)} cached)", unit="cell")
    if workers > 1 and len(todo) > 1:
        quiet = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"         # no bars from the workers (they read it when importing tqdm)
        try:
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                                     initializer=_init_worker, initargs=(str(feats), budget)) as pool:
                futures = {pool.submit(_run_in_worker, c): c for c in todo}
                for f in as_completed(futures):
                    save(futures[f], f.result())
                    bar.update()
        finally:
            if quiet is None:
                del os.environ["TQDM_DISABLE"]
            else:
                os.environ["TQDM_DISABLE"] = quiet
    elif todo:
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)                     # as in a worker: the same numbers
            bench = Workbench(feats, budget)
            for c in todo:
                save(c, bench.run(c))
                bar.update()
        finally:
            torch.set_num_threads(threads)
    bar.close()
    return [json.loads((folder / f"{c.key()}.json").read_text()) for c in todo_cells]


def best_linear_map(bench: Workbench, n_ref: int = 2000) -> dict[str, float]:
    """Notebook 04's yardstick under this budget's evaluation: the least-squares `llama_proj`
    from the Q-Former features of `n_ref` training images onto their notes (the answer key,
    which MiniGPT-4 never has; `reference.fit_notes_projection`), no training at all."""
    from .reference import fit_notes_projection
    model = bench.model("linear")
    ref = bench.feature_set("train", "linear", range(min(n_ref, len(bench.train_scenes))))
    model.llama_proj.load_state_dict(fit_notes_projection(model, ref))
    return bench.evaluate(model, bench.feature_set("test", "linear"))


def curated_set_metrics(bench: Workbench) -> dict[str, float] | None:
    """What stage 2 learns to imitate: the curated descriptions graded against their images
    (object recall, attribute accuracy, ...; `evaluate.caption_metrics`) and the share that names
    a position. None when the set's images have no known scenes (e.g. the paper's download)."""
    if any(s is None for s in bench.align_scenes):
        return None
    from .evaluate import caption_metrics
    caps = bench.align["captions"]
    return {**caption_metrics(caps, bench.align_scenes), "position_captions": share_naming_position(caps),
            "mean_words": sum(len(c.split()) for c in caps) / len(caps)}


def what_trains(bench: Workbench) -> list[dict]:
    """Per projector kind: the features it reads, its trainable tensors and their size, checked
    against the closed form (and that nothing frozen requires a gradient)."""
    cfg, d = bench.cfg, bench.llm.config.hidden_size
    hq = cfg.qformer["hidden_size"]
    last = sum(p.numel() for p in bench.encoder.qformer.encoder.layer[-1].parameters())
    expected = {"linear": hq * d + d, "mlp2": hq * d + d + d * d + d, "mlp3": hq * d + d + 2 * (d * d + d),
                "no_qformer": cfg.vision_width * cfg.proj_group * d + d, "finetune_qformer": last + hq * d + d}
    rows = []
    for kind in KINDS:
        model = bench.model(kind)
        named = model.trainable_parameters()
        n = sum(p.numel() for _, p in named)
        frozen = [k for k, p in model.named_parameters() if p.requires_grad and not k.startswith("llama_proj.")]
        if n != expected[kind] or frozen or not all(k.startswith("llama_proj.") for k, _ in named):
            raise AssertionError(f"{kind}: {n:,} trainable parameters (expected {expected[kind]:,}); "
                                 f"outside llama_proj requiring grad: {frozen[:3]}")
        shape = tuple(bench.feats["test"][FEATURES[kind]].shape[1:])
        rows.append({"projector": kind, "features": shape, "tensors": len(named), "params": n})
    return rows
