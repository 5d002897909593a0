"""Stage-1 recipes at tiny scale (notebook 02, paper §3.1): is a shorter schedule as good?

    python benchmarks/stage1_recipes.py [--run-dir runs/series] [--seeds 0 1 2] [--recipes default batch64]

Trains `llama_proj` with each recipe (steps, batch, peak learning rate; warmup and cosine as
notebook 02 sets them) for each seed, on notebook 02's cached features of its 20,000 training
shards (`--run-dir`: a folder where notebook 02 ran; its shards and cache are reused or made),
and grades it as the notebook does on the 300 test images: caption attribute accuracy,
hallucination-free share, CHAIR_i, and the failure rate of answers to the paper's detailed
description prompt; also the training seconds. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minigpt4_min import stage1
from minigpt4_min.config import STAGE1, get_config, train_config
from minigpt4_min.evaluate import caption_metrics, failure_rates
from minigpt4_min.model import MiniGPT4
from minigpt4_min.train import Trainer


def recipe(steps: int, batch: int, lr: float, note: str = "") -> dict:
    """steps x batch at peak lr (warmup and cosine as notebook 02 sets them), described."""
    about = f"{steps:,} x {batch}, lr {lr:.0e}".replace("e-0", "e-") + (f": {note}" if note else "")
    return dict(steps=steps, batch=batch, lr=lr, about=about)


_TINY = STAGE1["tiny"]
RECIPES = {
    "default": recipe(_TINY.max_steps, _TINY.batch_size, _TINY.lr, "the tiny preset (config.STAGE1)"),
    "batch64": recipe(1200, 64, 1e-2, "the tiny preset until 2026-12-02"),
    "batch32": recipe(1200, 32, 1e-2, "the tiny preset for part of 2026-12-02"),
    "batch40": recipe(1200, 40, 1e-2),
    "steps800": recipe(800, 64, 2e-2),
    "steps600": recipe(600, 64, 2e-2),
}


def run(base: MiniGPT4, train_fs, test_fs, steps: int, batch: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = MiniGPT4(base.cfg, base.encoder, base.llm, base.tokenizer)        # a fresh llama_proj
    tc = train_config(1, "tiny", max_steps=steps, batch_size=batch, lr=lr, min_lr=lr / 10,
                      warmup_steps=max(1, min(100, steps // 10)), seed=seed)
    t = time.perf_counter()
    Trainer(model, tc, stage1.caption_batches(train_fs, batch, base.cfg.max_txt_len_stage1)).train(progress=False)
    seconds = time.perf_counter() - t
    m = caption_metrics(stage1.caption(model, test_fs), test_fs.scenes)
    return {"seed": seed, "train_seconds": round(seconds, 1),
            "caption_attribute_accuracy": round(m["attribute_accuracy"], 4),
            "caption_hallucination_free": round(m["hallucination_free"], 4),
            "caption_chair_i": round(m["chair_i"], 4),
            "detail_failure_rate": round(failure_rates(stage1.describe_in_detail(model, test_fs))["any"], 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, default=Path("runs/series"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                    help="which recipes to run (default: all); " + "; ".join(
                        f"{n}: {r['about']}" for n, r in RECIPES.items()))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stage1_recipes.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    cfg = get_config("tiny")
    base = MiniGPT4.from_config(cfg)
    shards = a.run_dir / "shards"
    train_fs = stage1.encode_shards(base, stage1.write_shapesworld_shards(shards, "train", 20000, cfg.image_size),
                                    cache_dir=a.run_dir / "cache")
    test_fs = stage1.encode_shards(base, stage1.write_shapesworld_shards(shards, "test", 300, cfg.image_size),
                                   cache_dir=a.run_dir / "cache")
    res = {"vit_dtype": cfg.vit_dtype, "n_train": len(train_fs), "n_eval": len(test_fs),
           "about": {n: RECIPES[n]["about"] for n in a.recipes}, "recipes": {}}
    for name in a.recipes:
        r = RECIPES[name]
        res["recipes"][name] = [run(base, train_fs, test_fs, r["steps"], r["batch"], r["lr"], s) for s in a.seeds]
        print(name, json.dumps(res["recipes"][name]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
