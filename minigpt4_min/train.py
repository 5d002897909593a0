"""One trainer for both MiniGPT-4 stages (paper §3.1 stage 1, §3.3 stage 2).

Only `llama_proj` is trained: the optimizer is built from `model.trainable_parameters()`
and asserts nothing else requires a gradient; the frozen encoder and LLM stay in eval
mode. AdamW (0.9, 0.999), weight decay only on >= 2-D weights; linear warmup from
`warmup_lr` to `lr`, then cosine to `min_lr` (the paper's `linear_warmup_cosine_lr`).
Checkpoints hold only the trained weights (safetensors) plus the optimizer moments and
the step, so a resumed run continues exactly as an uninterrupted one: batches are drawn
from a generator seeded by (seed, step), never from global random state.

Memory (memory.py): `cfg.accum_steps` micro-batches of `cfg.batch_size` make one optimizer
step (gradient accumulation), micro-batch k of step s drawn from the generator of
(seed, s, k). The loss of each is its summed answer-token loss divided by the answer
tokens of the whole step, so the accumulated gradient is that of ONE batch of
batch_size x accum_steps: the mean over all its answer tokens (LAVIS instead divides each
micro-batch's mean by accum_steps, the same number only when every micro-batch holds as
many answer tokens). `cfg.grad_checkpointing` recomputes the frozen LLM's activations in
backward (`MiniGPT4.set_gradient_checkpointing`).
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


def batch_generator(cfg: TrainConfig, step: int, micro: int = 0) -> torch.Generator:
    """The random source of micro-batch `micro` of step `step`: depends only on (seed, step,
    micro), so resuming is exact. Micro-batch 0 has the seed a step always had. torch's CPU
    generator keeps only the low 32 bits of a seed, so micro-batches are set apart by an odd
    32-bit constant (2^32 / golden ratio), not by a power of two: for k < 64 micro-batch k
    of a step lands at least 3.4 x 10^7 steps away from any other step's seeds."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + micro * 0x9E3779B1)


def concat_batches(batches: list[dict]) -> dict:
    """Micro-batches -> the one batch they make: tensors concatenated on dim 0 (feats
    (B_k, N, Hq) -> (sum B_k, N, Hq)), lists joined; any other field must be equal in all."""
    out = {}
    for k, v in batches[0].items():
        vals = [b[k] for b in batches]
        if isinstance(v, torch.Tensor):
            out[k] = torch.cat(vals)
        elif isinstance(v, list):
            out[k] = [x for part in vals for x in part]
        elif all(x == v for x in vals):
            out[k] = v
        else:
            raise ValueError(f"micro-batches disagree on {k!r}: {vals}")
    return out


def micro_batches(get_batch: Callable, cfg: TrainConfig, step: int) -> list:
    """The `cfg.accum_steps` micro-batches of `step`, each from its own seeded generator."""
    return [get_batch(step, batch_generator(cfg, step, k)) for k in range(cfg.accum_steps)]


def accumulated(get_batch: Callable, cfg: TrainConfig) -> Callable:
    """`get_batch` as a trainer with `cfg` sees it, one step at a time: the step's
    `cfg.accum_steps` micro-batches concatenated into one batch of `cfg.global_batch`
    (a trainer with accum_steps=1 fed this makes the same updates; tests prove it)."""
    def get(step: int, g: torch.Generator | None = None) -> dict:
        return concat_batches(micro_batches(get_batch, cfg, step))
    return get


class Trainer:
    """Train `model.llama_proj` on batches from `get_batch(step, generator)`.

    `model` must offer `trainable_parameters()` (named), `frozen_modules()` and
    `loss(batch)`; `get_batch` returns whatever `model.loss` takes. With accum_steps > 1 also
    `num_targets(batch)` and `loss(batch, token_divisor=...)`; with grad_checkpointing
    `set_gradient_checkpointing(on)` (MiniGPT4 has them all).
    """

    def __init__(self, model, cfg: TrainConfig, get_batch: Callable, out_dir: str | Path | None = None):
        self.model, self.cfg, self.get_batch = model, cfg, get_batch
        self.out_dir = Path(out_dir) if out_dir else None
        self.params = list(model.trainable_parameters())
        names = {n for n, _ in self.params}
        others = [n for n, p in model.named_parameters() if p.requires_grad and n not in names]
        if others:
            raise RuntimeError(f"parameters outside the projection require grad: {others[:5]}")
        if cfg.accum_steps > 1 and not hasattr(model, "num_targets"):
            raise TypeError(f"accum_steps={cfg.accum_steps} needs a model with num_targets(batch) and "
                            f"loss(batch, token_divisor=...) (MiniGPT4 has both); {type(model).__name__} "
                            "has no num_targets: use accum_steps=1")
        if cfg.grad_checkpointing and not hasattr(model, "set_gradient_checkpointing"):
            raise TypeError(f"grad_checkpointing=True needs model.set_gradient_checkpointing; "
                            f"{type(model).__name__} has none")
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
    def micro_batches(self, step: int) -> list:
        """The `accum_steps` micro-batches of `step` (`micro_batches`)."""
        return micro_batches(self.get_batch, self.cfg, step)

    def accumulate_gradients(self) -> float:
        """Backward through this step's micro-batches; returns the step's loss (the mean over
        all its answer tokens). One micro-batch: `model.loss(batch)`, as always."""
        batches = self.micro_batches(self.step)
        if len(batches) == 1:
            loss = self.model.loss(batches[0])
            loss.backward()
            return loss.item()
        total = sum(self.model.num_targets(b) for b in batches)    # answer tokens of the step
        if total == 0:
            raise ValueError(f"step {self.step}: its {len(batches)} micro-batches hold no answer tokens")
        val = 0.0
        for b in batches:          # summed token loss / the step's tokens: the shares add up to the mean
            loss = self.model.loss(b, token_divisor=lambda n: total)
            loss.backward()
            val += loss.item()
        return val

    def train(self, max_steps: int | None = None, progress: bool = True) -> list[dict]:
        """Run until `max_steps` (default cfg.max_steps); returns the loss history."""
        end = min(max_steps or self.cfg.max_steps, self.cfg.max_steps)
        if self.cfg.grad_checkpointing:
            self.model.set_gradient_checkpointing(True)
        self.model.train_mode()
        bar = tqdm(total=end, initial=self.step, desc="train llama_proj", disable=not progress)
        t0, running = time.time(), None
        while self.step < end:
            lr = lr_at(self.step, self.cfg)
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            val = self.accumulate_gradients()
            self.opt.step()
            self.step += 1
            running = val if running is None else 0.95 * running + 0.05 * val
            if self.step % self.cfg.log_every == 0 or self.step == end:
                self.history.append({"step": self.step, "loss": val, "lr": lr,
                                     "seconds": round(time.time() - t0, 2)})
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.1e}")
            bar.update(1)
            if self.out_dir and self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0:
                self.save(self.out_dir / f"step_{self.step:06d}")
        bar.close()
        if self.cfg.grad_checkpointing:
            self.model.set_gradient_checkpointing(False)
        if hasattr(self.model, "projection_source"):    # the chat then knows it is not random
            self.model.projection_source = f"trained in this session ({self.step} steps)"
        if self.out_dir:
            self.save(self.out_dir / "last")
        return self.history
