"""One trainer for both MiniGPT-4 stages (paper §3.1 stage 1, §3.3 stage 2).

Only `llama_proj` is trained: the optimizer is built from `model.trainable_parameters()`
and asserts nothing else requires a gradient; the frozen encoder and LLM stay in eval
mode. AdamW (0.9, 0.999), weight decay only on >= 2-D weights; linear warmup from
`warmup_lr` to `lr`, then cosine to `min_lr` (the paper's `linear_warmup_cosine_lr`).
Checkpoints hold only the trained weights (safetensors) plus the optimizer moments and
the step, so a resumed run continues exactly as an uninterrupted one: batches are drawn
from a generator seeded by (seed, step), never from global random state.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup (warmup_lr -> lr over warmup_steps), then cosine (lr -> min_lr)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(cfg.warmup_steps, 1)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay only on weights of 2 or more dimensions (not biases / norms)."""
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.warmup_lr, betas=cfg.betas)


def batch_generator(cfg: TrainConfig, step: int) -> torch.Generator:
    """The random source of step `step`: depends only on (seed, step), so resuming is exact."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


class Trainer:
    """Train `model.llama_proj` on batches from `get_batch(step, generator)`.

    `model` must offer `trainable_parameters()` (named), `frozen_modules()` and
    `loss(batch)`; `get_batch` returns whatever `model.loss` takes.
    """

    def __init__(self, model, cfg: TrainConfig, get_batch: Callable, out_dir: str | Path | None = None):
        self.model, self.cfg, self.get_batch = model, cfg, get_batch
        self.out_dir = Path(out_dir) if out_dir else None
        self.params = list(model.trainable_parameters())
        names = {n for n, _ in self.params}
        others = [n for n, p in model.named_parameters() if p.requires_grad and n not in names]
        if others:
            raise RuntimeError(f"parameters outside the projection require grad: {others[:5]}")
        self.opt = build_optimizer(self.params, cfg)
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------- checkpoints
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in self.params}, str(folder / "model.safetensors"))
        moments = {}
        for i, (n, p) in enumerate(self.params):
            st = self.opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    moments[f"{n}.{k}"] = st[k].contiguous()
            if "step" in st:
                moments[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
        save_file(moments, str(folder / "optimizer.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps(
            {"step": self.step, "config": asdict(self.cfg), "history": self.history}, indent=1))
        return folder

    def resume(self, folder: str | Path) -> None:
        folder = Path(folder)
        w = load_file(str(folder / "model.safetensors"))
        m = load_file(str(folder / "optimizer.safetensors"))
        state = json.loads((folder / "trainer_state.json").read_text())
        with torch.no_grad():
            for n, p in self.params:
                if n not in w:
                    raise ValueError(f"checkpoint {folder} has no tensor {n!r}")
                p.copy_(w[n])
                if f"{n}.exp_avg" in m:
                    self.opt.state[p] = {"step": m[f"{n}.step"].reshape(()).float(),
                                         "exp_avg": m[f"{n}.exp_avg"].clone(),
                                         "exp_avg_sq": m[f"{n}.exp_avg_sq"].clone()}
        self.step, self.history = state["step"], state["history"]

    # ------------------------------------------------------------- training
    def train(self, max_steps: int | None = None, progress: bool = True) -> list[dict]:
        """Run until `max_steps` (default cfg.max_steps); returns the loss history."""
        end = min(max_steps or self.cfg.max_steps, self.cfg.max_steps)
        self.model.train_mode()
        bar = tqdm(total=end, initial=self.step, desc="train llama_proj", disable=not progress)
        t0, running = time.time(), None
        while self.step < end:
            lr = lr_at(self.step, self.cfg)
            for g in self.opt.param_groups:
                g["lr"] = lr
            batch = self.get_batch(self.step, batch_generator(self.cfg, self.step))
            loss = self.model.loss(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            val = loss.item()
            running = val if running is None else 0.95 * running + 0.05 * val
            if self.step % self.cfg.log_every == 0 or self.step == end:
                self.history.append({"step": self.step, "loss": val, "lr": lr,
                                     "seconds": round(time.time() - t0, 2)})
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.1e}")
            bar.update(1)
            if self.out_dir and self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0:
                self.save(self.out_dir / f"step_{self.step:06d}")
        bar.close()
        if hasattr(self.model, "projection_source"):    # the chat then knows it is not random
            self.model.projection_source = f"trained in this session ({self.step} steps)"
        if self.out_dir:
            self.save(self.out_dir / "last")
        return self.history
