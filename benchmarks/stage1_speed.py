"""Stage-1 speed at tiny scale on a CPU (notebook 02, paper §3.1): where the time goes.

    python benchmarks/stage1_speed.py [--batch 32] [--steps 20] [--images 2000] [--run-dir runs/series]

Three measurements, each with the shipped frozen parts and the library's own code:
- a training step of `llama_proj` (the Trainer's loop: loss through the frozen LLM,
  backward, AdamW), median over `--steps` after two warm-up steps, in fp32 and, where the
  CPU has bf16 instructions, under `torch.autocast("cpu", dtype=torch.bfloat16)`;
- a profile of fp32 steps grouped by kind of operator (matrix multiplies, attention,
  cross-entropy, the rest), as shares of the profiled CPU time;
- the work before training starts: rendering + writing `--images` ShapesWorld samples as
  shards, then encoding them with the frozen encoder, per 1,000 images, with the ViT in fp32
  (the tiny preset's) and, where the CPU has bf16 instructions, in bf16 (`vit_dtype`);
and, with `--run-dir`, the times a `make series` run recorded for notebook 02.

Run it on an otherwise idle machine (2 threads on 2 cores: any other busy process makes
every OpenMP barrier wait); the load average is saved with the result.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from minigpt4_min import shapesworld as sw
from minigpt4_min import stage1
from minigpt4_min.config import STAGE1, get_config, train_config
from minigpt4_min.encoder import VisualEncoder
from minigpt4_min.model import MiniGPT4
from minigpt4_min.train import Trainer

GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
          "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
          "cross_entropy": ("cross_entropy", "log_softmax", "nll_loss")}


def synthetic_features(cfg, n: int, seed: int = 0) -> stage1.FeatureSet:
    """Captions as the shards carry them, with random query features (speed does not
    depend on their values)."""
    rng = random.Random(seed)
    scenes = [sw.scene_at("train", i) for i in range(n)]
    feats = torch.randn(n, cfg.num_query_tokens, cfg.proj_in, generator=torch.Generator().manual_seed(seed))
    return stage1.FeatureSet(feats, [sw.caption(s, rng) for s in scenes], scenes, [str(i) for i in range(n)])


def step_seconds(model, fs, batch: int, steps: int, bf16: bool) -> float:
    tc = train_config(1, "tiny", max_steps=steps + 2, batch_size=batch, warmup_steps=1, log_every=1)
    trainer = Trainer(model, tc, stage1.caption_batches(fs, batch, model.cfg.max_txt_len_stage1))
    times = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for k in range(steps + 2):
            t = time.perf_counter()
            trainer.train(max_steps=k + 1, progress=False)
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def op_shares(model, fs, batch: int, steps: int = 3) -> dict[str, float]:
    tc = train_config(1, "tiny", max_steps=steps + 1, batch_size=batch, warmup_steps=1)
    trainer = Trainer(model, tc, stage1.caption_batches(fs, batch, model.cfg.max_txt_len_stage1))
    trainer.train(max_steps=1, progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train(max_steps=steps + 1, progress=False)
    total, shares = 0.0, dict.fromkeys([*GROUPS, "other"], 0.0)
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total
        total += t
        group = next((g for g, names in GROUPS.items() if any(n in ev.key for n in names)), "other")
        shares[group] += t
    return {g: round(v / total, 3) for g, v in shares.items()}


def before_training(model, n: int, dtypes: list[str]) -> dict[str, float]:
    """Seconds per 1,000 images to write ShapesWorld shards, then to encode them with the ViT in
    each of `dtypes` (the same shards, no cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        shards = stage1.write_shapesworld_shards(Path(tmp) / "shards", "train", n, model.cfg.image_size,
                                                 shard_size=max(n // 2, 1))
        res = {"write_shards_s_per_1000": round(1000 * (time.perf_counter() - t) / n, 2)}
        for dtype in dtypes:
            m = MiniGPT4(model.cfg, VisualEncoder.load(get_config("tiny", vit_dtype=dtype)), model.llm, model.tokenizer)
            t = time.perf_counter()
            stage1.encode_shards(m, shards)
            res[f"encode_s_per_1000_vit_{dtype}"] = round(1000 * (time.perf_counter() - t) / n, 2)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=STAGE1["tiny"].batch_size, help="default: the tiny preset's")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", type=Path, default=None, help="a `make series` output folder (metrics.json)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stage1_speed.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = MiniGPT4.from_config(get_config("tiny"))
    fs = synthetic_features(model.cfg, 2000)
    res = {"batch": a.batch, "threads": a.threads, "load_average_before": os.getloadavg()[0],
           "step_s_fp32": round(step_seconds(model, fs, a.batch, a.steps, bf16=False), 4)}
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if bf16:
        res["step_s_bf16_autocast"] = round(step_seconds(model, fs, a.batch, a.steps, bf16=True), 4)
    res["op_shares_fp32"] = op_shares(model, fs, a.batch)
    res.update(before_training(model, a.images, ["float32", "bfloat16"] if bf16 else ["float32"]))
    if a.run_dir and (a.run_dir / "metrics.json").exists():
        nb = json.loads((a.run_dir / "metrics.json").read_text()).get("02_stage1_pretraining", {})
        res["notebook_02"] = {k: nb.get(k) for k in ("notebook_seconds", "train_seconds", "steps",
                                                      "notebook_seconds_to_train_start",
                                                      "caption_attribute_accuracy", "detail_failure_rate")}
    res["load_average_after"] = os.getloadavg()[0]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
